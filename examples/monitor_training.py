"""Record attention maps while training, with fxcapture.Monitor.

Trains a small random-weight ViT (fxcapture.cli.models.TinyViT) for 3 epochs on
synthetic data and records, on batch 0 of epochs 0 and 2, every block's attention
map (the local ``attn`` of ``Attention.forward``, not a module output) and, for
every batch of those epochs, the logits (the module ``head``). It saves them, loads
them back and prints how far the maps moved during training.

Module outputs alone are recorded by calling the model itself, as with the seed
monitor (``--model-itself``: forward hooks, no local); locals such as ``attn``, and
``torch.compile``, need ``monitor.model``, a drop-in module with the model's
parameters and output.

    python examples/monitor_training.py [--out runs/attention] [--compile | --model-itself]
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--compile", action="store_true", help="train torch.compile(monitor.model)")
    parser.add_argument("--model-itself", action="store_true",
                        help="train the model itself: module outputs only (the seed's way)")
    args = parser.parse_args(argv)
    out_dir = args.out or tempfile.mkdtemp(prefix="fxcapture-monitor-")

    torch.manual_seed(0)
    model = TinyViT(image_size=32, patch=8, dim=32, depth=2, heads=2, num_classes=4)
    layers = {"head": {"alias": "logits", "record_type": "epoch_full"}}
    if not args.model_itself:
        layers["attn"] = {"alias": "attention", "record_type": "single"}
    monitor = Monitor(model, layers, epochs_to_record=[0, 2], batch_indices=[0],
                      output_dir=out_dir)  # fmt: skip
    # monitor.model: same parameters and output as `model`, records locals too
    net = model if args.model_itself else monitor.model
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
            logits = monitor.get_epoch_data()
            if logits:
                batches = list(logits["logits"]["data"].values())
                print(f"epoch {epoch}: logits of the epoch {tuple(torch.cat(batches).shape)}")
            paths = monitor.save_single_outputs() + monitor.save_epoch_outputs()
            monitor.clear_current_epoch_data()
            print(f"epoch {epoch}: loss {total / len(data):.3f}, saved {len(paths)} file(s)")
    finally:
        monitor.remove_hooks()

    loaded_logits = Monitor.load(out_dir, "epoch_full")["logits"]
    print(f"loaded back from {out_dir}: logits of {list(loaded_logits['data'])}")
    if args.model_itself:
        return {"logits": loaded_logits}
    loaded = Monitor.load(out_dir)["attention"]
    print(f"loaded back from {out_dir}: attention of {list(loaded['data'])}")
    first, last = loaded["data"][(0, 0)], loaded["data"][(2, 0)]
    for key in first:
        change = (last[key] - first[key]).abs().mean().item()
        rows = last[key].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # probabilities
        print(f"  {key}: {tuple(first[key].shape)}, mean |epoch 2 - epoch 0| = {change:.4f}")
    return {"logits": loaded_logits, "attention": loaded}


if __name__ == "__main__":
    main()
