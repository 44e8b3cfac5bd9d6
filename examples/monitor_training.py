"""Record attention maps while training, with fxcapture.Monitor.

Trains a small random-weight ViT (fxcapture.cli.models.TinyViT) for 3 epochs on
synthetic data, records every block's attention map (the local ``attn`` of
``Attention.forward``, not a module output) on batch 0 of epochs 0 and 2, saves
them, loads them back and prints how far the maps moved during training.

    python examples/monitor_training.py [--out runs/attention] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from fxcapture import Monitor
from fxcapture.cli.models import TinyViT


def synthetic_data(num_batches: int, batch_size: int = 8, seed: int = 0):
    """Images whose class is the quadrant holding a bright square: learnable quickly."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(num_batches):
        x = torch.randn(batch_size, 3, 32, 32, generator=g) * 0.1
        y = torch.randint(0, 4, (batch_size,), generator=g)
        for i, label in enumerate(y.tolist()):
            r, c = divmod(label, 2)
            x[i, :, 16 * r : 16 * r + 8, 16 * c : 16 * c + 8] += 1.0
        data.append((x, y))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--compile", action="store_true", help="train torch.compile(model)")
    args = parser.parse_args()
    out_dir = args.out or tempfile.mkdtemp(prefix="fxcapture-monitor-")

    torch.manual_seed(0)
    model = TinyViT(image_size=32, patch=8, dim=32, depth=2, heads=2, num_classes=4)
    monitor = Monitor(
        model,
        {"attn": {"alias": "attention", "record_type": "single"}},
        epochs_to_record=[0, 2],
        batch_indices=[0],
        output_dir=out_dir,
    )
    net = monitor.model  # same parameters and output as `model`; records on the side
    if args.compile:
        net = torch.compile(net, backend="aot_eager", fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = synthetic_data(num_batches=8)

    try:
        for epoch in range(3):
            monitor.set_epoch(epoch)
            total = 0.0
            for batch_idx, (x, y) in enumerate(data):
                monitor.set_batch_idx(batch_idx)
                loss = F.cross_entropy(net(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            recorded = monitor.get_single_data()
            if recorded:
                maps = recorded["attention"]["data"][(epoch, 0)]
                shapes = {key: tuple(v.shape) for key, v in maps.items()}
                print(f"epoch {epoch}: recorded {shapes}")
            paths = monitor.save_single_outputs()
            monitor.clear_current_epoch_data()
            print(f"epoch {epoch}: loss {total / len(data):.3f}, saved {len(paths)} file(s)")
    finally:
        monitor.remove_hooks()

    loaded = Monitor.load(out_dir)["attention"]
    print(f"loaded back from {out_dir}: {list(loaded['data'])}")
    first, last = loaded["data"][(0, 0)], loaded["data"][(2, 0)]
    for key in first:
        change = (last[key] - first[key]).abs().mean().item()
        rows = last[key].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # probabilities
        print(f"  {key}: {tuple(first[key].shape)}, mean |epoch 2 - epoch 0| = {change:.4f}")


if __name__ == "__main__":
    main()
