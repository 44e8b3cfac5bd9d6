"""Throughput and memory of ``fxcapture.extract`` over a dataset.

Three loops over the same ``DataLoader`` (synthetic images, resnet50, random weights),
measured side by side in one run (interleaved rounds, see ``common.py``):

- ``bare``: ``model(x)`` for every batch, nothing kept, nothing written;
- ``hooks``: the usual loop, a forward hook keeping ``layer4`` reduced on the device
  and ``.cpu().numpy()`` per batch into a list, concatenated at the end;
- ``extract``: ``fxcapture.extract(..., reduce="mean")`` into a fresh directory
  (chunks, the final ``.npy`` and the manifest included in the time).

Target (issue 6): extract >= 0.95 x the bare loop's samples/s. Then peak RSS of
separate processes storing layer4 *whole* (no reduction) for two dataset sizes: the
hook loop keeps every row in memory, extract streams them to disk.

Text (issue 16): GPT-2 (the 124M default config, random weights) over synthetic
documents cut into windows and sorted by length, the residual stream of 3 layers
stored per real token in bfloat16 (``reduce="tokens"``): tokens/s of ``extract`` vs
a bare forward loop over the same batches, then tokens/s of reading the store back
in shuffled batches with ``load(out).loader``.

Usage::

    python benchmarks/extract.py                       # CPU (+ CUDA when present), ~8 minutes
    python benchmarks/extract.py --quick               # tiny sizes: checks the script works
    python benchmarks/extract.py --save                 # the README figures
    python benchmarks/extract.py --text-only --text-windows 64    # the text table only
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `fxcapture` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Table,
    add_common_arguments,
    devices,
    finish_arguments,
    fmt_ratio,
    header_line,
    progress,
    ratio,
    report,
    synchronize,
    time_call,
    time_interleaved,
)

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.95  # extract / bare samples per second
NAME = "layer4"
TEXT_RSS_NAMES = ["h.0", "h.2", "h.3"]  # the peak RSS runs of text: a 4-layer GPT-2
TEXT_RSS_WIDTH = 256


def build_model(arch: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


def make_loader(samples: int, image_size: int, batch_size: int, device: torch.device, workers: int) -> Any:
    from torch.utils.data import DataLoader

    from fxcapture.dataset.sources import SyntheticImages

    dataset = SyntheticImages(samples, (3, image_size, image_size))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")


# -- the three loops ---------------------------------------------------------------------
def bare_loop(model: torch.nn.Module, loader: Any, device: torch.device) -> None:
    with torch.inference_mode():
        for x, _ in loader:
            model(x.to(device, non_blocking=True))
    synchronize(device)


def hook_loop(model: torch.nn.Module, loader: Any, device: torch.device, reduce: bool = True) -> np.ndarray:
    """The usual way: a forward hook and ``.cpu().numpy()`` per batch, all rows in a list."""
    rows: list[np.ndarray] = []

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        value = output.mean((2, 3)) if reduce else output
        rows.append(value.cpu().numpy())

    handle = model.get_submodule(NAME).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for x, _ in loader:
                model(x.to(device, non_blocking=True))
    finally:
        handle.remove()
    return np.concatenate(rows)


def extract_loop(
    model: torch.nn.Module, loader: Any, device: torch.device, reduce: str | None = "mean", read: bool = False
) -> np.ndarray | None:
    """``fxcapture.extract`` into a fresh directory; ``read``: return the stored rows."""
    from fxcapture import extract

    out = Path(tempfile.mkdtemp(prefix="fxcapture-bench-"))
    try:
        feats = extract(model, NAME, loader, out=out, reduce=reduce, device=device, progress=False, overwrite=True)
        return np.array(feats[NAME]) if read else None
    finally:
        shutil.rmtree(out, ignore_errors=True)


# -- throughput --------------------------------------------------------------------------
def measure_throughput(device: torch.device, args: argparse.Namespace) -> Table:
    headers = ["method", "samples/s (median)", "samples/s (best)", "x bare", "x hooks", "same values"]
    table = Table(
        f"{args.arch}, {args.samples} synthetic images {args.image_size}px, batch {args.batch_size}, "
        f"{NAME} mean ({device.type})",
        headers,
    )
    model = build_model(args.arch).to(device)
    loader = make_loader(args.samples, args.image_size, args.batch_size, device, args.workers)
    progress(f"{device}: checking values")
    stored = extract_loop(model, loader, device, read=True)
    same = np.allclose(stored, hook_loop(model, loader, device), rtol=1e-4, atol=1e-5)
    contenders: dict[str, Callable[[], Any]] = {
        "bare": lambda: bare_loop(model, loader, device),
        "hooks": lambda: hook_loop(model, loader, device),
        "extract": lambda: extract_loop(model, loader, device),
    }
    progress(f"{device}: timing {args.rounds} interleaved rounds of {args.samples} samples")
    timings = time_interleaved(contenders, args.rounds, warmup=1, device=device)
    for method, t in timings.items():
        table.add(
            method, f"{args.samples / t.median:.1f}", f"{args.samples / t.best:.1f}",
            # samples/s ratios: the inverse of the time ratios, per round
            fmt_ratio(1 / ratio(timings, method, "bare")), fmt_ratio(1 / ratio(timings, method, "hooks")),
            "yes" if method == "bare" or same else "NO",
        )  # fmt: skip
    x_bare = 1 / ratio(timings, "extract", "bare")
    table.notes.append(
        f"extract x bare {x_bare:.3f} samples/s (target >= {TARGET}: {'met' if x_bare >= TARGET else 'not met'}); "
        "extract prunes the graph after layer4 (avgpool and fc are not run), the other loops run the whole model"
    )
    table.notes.append(f"ratios: median over {args.rounds} rounds of per-round ratios; 'same values': extract vs hooks")
    return table


# -- peak memory (separate processes) ----------------------------------------------------
def resident_bytes() -> int:
    """The process's resident set size now (Linux ``/proc``; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_above_start(fn: Callable[[], Any]) -> int:
    """Peak resident bytes while ``fn`` runs (sampled every millisecond) above those at its start."""
    start, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], resident_bytes()) - start


def rss_child(method: str, samples: int, args: argparse.Namespace) -> None:
    """Run one loop storing layer4 whole; print the loop's peak RSS above its start, in bytes."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.rss_device)
    model = build_model(args.arch).to(device)
    loader = make_loader(samples, args.rss_image_size, args.batch_size, device, args.workers)
    loops = {
        "bare": lambda: bare_loop(model, loader, device),
        "hooks": lambda: hook_loop(model, loader, device, reduce=False),
        "extract": lambda: extract_loop(model, loader, device, reduce=None),
    }
    print(peak_above_start(loops[method]))


def run_child(options: list[str], what: str) -> list[int]:
    """Run this script in a fresh process with ``options``; the numbers of its last output line."""
    command = [sys.executable, str(Path(__file__).resolve()), *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-2000:]}")
    return [int(v) for v in done.stdout.splitlines()[-1].split()]


def peak_rss(method: str, samples: int, device: torch.device, args: argparse.Namespace) -> int:
    options = ["--rss-child", method, str(samples), "--arch", args.arch, "--rss-image-size", str(args.rss_image_size),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--workers", str(args.workers),
               "--rss-device", str(device)]  # fmt: skip
    return run_child(options, f"{method} with {samples} samples")[0]


def measure_memory(device: torch.device, args: argparse.Namespace) -> Table:
    small, large = args.rss_sizes
    size = args.rss_image_size
    side = -(-size // 32)  # layer4 is 1/32 of the input
    row_mib = 2048 * side * side * 4 / 2**20
    table = Table(
        f"peak RSS during the loop, {NAME} stored whole (2048x{side}x{side} float32 = {row_mib * 1024:.0f} KiB a row), "
        f"{size}px ({device.type})",
        ["method", f"{small} samples MiB", f"{large} samples MiB", "growth MiB", "rows' size MiB"],
    )
    for method in ("bare", "hooks", "extract"):
        progress(f"{device}: peak RSS of {method} for {small} and {large} samples")
        peaks = [peak_rss(method, n, device, args) for n in (small, large)]
        kept = "-" if method == "bare" else f"{(large - small) * row_mib:.0f}"
        table.add(method, f"{peaks[0] / 2**20:.0f}", f"{peaks[1] / 2**20:.0f}",
                  f"{(peaks[1] - peaks[0]) / 2**20:.0f}", kept)  # fmt: skip
    table.notes.append(
        "each cell is a separate process: its peak resident memory during the loop, sampled every "
        "millisecond, above what was resident before the loop (model and imports left out); "
        "the hook loop's peak includes np.concatenate's copy of its rows, extract's its chunk buffer (at most "
        "16 MiB) and the batches queued for the writer; 'rows' size' is what the extra "
        f"{large - small} rows weigh: the hook loop holds them, extract streams them to disk"
    )
    return table


# -- text: tokens through GPT-2, stored per token -----------------------------------------
def text_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, list[str], int]:
    """GPT-2 (124M config; 2 tiny layers with --quick), a loader of sorted token windows,
    the 3 residual-stream layers stored, and the real tokens per pass."""
    import transformers
    from torch.utils.data import DataLoader

    from fxcapture.dataset.text import ByteTokenizer, TextDataset, synthetic_texts

    small = dict(n_layer=2, n_embd=64, n_head=2) if args.quick else {}
    config = transformers.GPT2Config(**small)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    length = 32 if args.quick else args.text_length
    texts = synthetic_texts(args.text_windows, max_words=length // 4)  # ~5 bytes a word: 1 to ~1.2 windows each
    data = TextDataset(texts, ByteTokenizer(config.vocab_size), max_length=length, stride=length,
                       sort_window=8 * args.text_batch)  # fmt: skip
    loader = DataLoader(data, batch_size=args.text_batch, collate_fn=data.collate_fn)
    layers = sorted({round(i * (config.n_layer - 1) / 2) for i in range(3)})
    return model, loader, [f"h.{i}" for i in layers], int(data.lengths.sum())


def bare_text_loop(model: torch.nn.Module, loader: Any, device: torch.device, steady: list[float]) -> None:
    """A forward per batch; appends to ``steady`` the seconds from the second batch on."""
    second = None
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            if i == 1:
                synchronize(device)
                second = time.perf_counter()
            model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
    synchronize(device)
    if second is not None:
        steady.append(time.perf_counter() - second)


def extract_text(model: torch.nn.Module, names: list[str], loader: Any, device: torch.device, out: Path,
                 steady: list[float] | None = None) -> Any:  # fmt: skip
    """``extract`` per token in bfloat16; appends to ``steady`` the seconds from the moment the
    second batch's inputs are made (the first batch, which traces the model, is done) to the end."""
    from fxcapture import extract

    marks: list[float] = []

    def inputs(batch: dict) -> dict:
        marks.append(time.perf_counter())
        return batch

    feats = extract(model, names, loader, out=out, reduce="tokens", dtype="bfloat16", device=device,
                    progress=False, overwrite=True, inputs=inputs)  # fmt: skip
    if steady is not None and len(marks) > 1:
        steady.append(time.perf_counter() - marks[1])
    return feats


def text_values_match(model: torch.nn.Module, names: list[str], loader: Any, feats: Any, device: torch.device) -> bool:
    """The store's first batch against forward hooks on the same batch, masked by hand."""
    batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in names]  # fmt: skip
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    real = batch["attention_mask"].bool()
    count = int(real.sum())
    return all(
        np.allclose(feats[n][:count], seen[n][real].bfloat16().float().cpu().numpy(), rtol=1e-2, atol=1e-2)
        for n in names
    )


def measure_text(device: torch.device, args: argparse.Namespace) -> Table:
    model, loader, names, tokens = text_setup(args)
    model.to(device)
    config = model.config
    table = Table(
        f"text: GPT-2 {config.n_layer} layers x {config.n_embd} ({'tiny, --quick' if args.quick else '124M config'}), "
        f"{len(loader.dataset)} windows of <= {loader.dataset.settings['max_length']} tokens sorted by length, "
        f"batch {args.text_batch}; {', '.join(names)} stored per token in bfloat16 ({device.type})",
        ["method", "tokens/s (median)", "tokens/s (best)", "x bare", "tokens/s after batch 1", "x bare after batch 1",
         "same values"],
    )
    work = Path(tempfile.mkdtemp(prefix="fxcapture-bench-text-"))
    try:
        progress(f"{device}: text, checking values")
        feats = extract_text(model, names, loader, device, work / "check")
        same = text_values_match(model, names, loader, feats, device)
        steady: dict[str, list[float]] = {"bare forward": [], "extract (tokens, bfloat16)": []}
        contenders: dict[str, Callable[[], Any]] = {
            "bare forward": lambda: bare_text_loop(model, loader, device, steady["bare forward"]),
            "extract (tokens, bfloat16)": lambda: extract_text(
                model, names, loader, device, work / "timed", steady["extract (tokens, bfloat16)"]),
        }  # fmt: skip
        progress(f"{device}: text, timing {args.rounds} interleaved rounds of {tokens} tokens")
        timings = time_interleaved(contenders, args.rounds, warmup=1, device=device)
        first = int(next(iter(loader))["attention_mask"].sum())
        later = {k: [(tokens - first) / t for t in v[-args.rounds:]] for k, v in steady.items()}
        x_later = {k: statistics.median(a / b for a, b in zip(v, later["bare forward"])) for k, v in later.items()}
        for method, t in timings.items():
            checked = "yes" if same or method == "bare forward" else "NO"
            table.add(method, f"{tokens / t.median:,.0f}", f"{tokens / t.best:,.0f}",
                      fmt_ratio(1 / ratio(timings, method, "bare forward")),
                      f"{statistics.median(later[method]):,.0f}", fmt_ratio(x_later[method]), checked)  # fmt: skip
        readers = {
            "read back, shuffled": lambda: sum(len(b) for b in feats.loader(names[0], 4096, shuffle=True, seed=0)),
            "read back, in order": lambda: sum(len(b) for b in feats.loader(names[0], 4096, shuffle=False)),
        }
        for method, fn in readers.items():
            times = [time_call(fn)[0] for _ in range(max(3, args.rounds))]
            rows = len(feats[names[0]])
            table.add(f"{method} (one key, batches of 4096)", f"{rows / statistics.median(times):,.0f}",
                      f"{rows / min(times):,.0f}", "-", "-", "-", "-")  # fmt: skip
        x_bare = 1 / ratio(timings, "extract (tokens, bfloat16)", "bare forward")
        x_extract = x_later["extract (tokens, bfloat16)"]
        row_bytes = len(names) * config.n_embd * 2
        table.notes.append(
            f"extract x bare {x_extract:.3f} tokens/s from the second batch on (target >= {TARGET}: "
            f"{'met' if x_extract >= TARGET else 'not met'}), {x_bare:.3f} for the whole call; the first batch of "
            "an extract call traces the model by running it (torch.export) and checksums the weights for the "
            f"run's identity, a one-time cost that a corpus amortizes; {tokens} real tokens a pass "
            f"({first} in the first batch), {row_bytes} bytes stored per token ({len(names)} keys), "
            "plus ids and positions"
        )
        table.notes.append(
            "read back: every token of one key once, as torch bfloat16 batches from the memory-mapped chunks "
            "(warm page cache: the store was just written)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return table


def text_rss_child(method: str, documents: int, args: argparse.Namespace) -> None:
    """Store 3 layers of a small GPT-2 per token for ``documents`` texts; print the loop's peak
    RSS above its start and the real tokens, as two numbers."""
    import transformers
    from torch.utils.data import DataLoader

    from fxcapture.dataset.text import ByteTokenizer, TextDataset, synthetic_texts

    torch.set_num_threads(args.threads)
    config = transformers.GPT2Config(n_layer=4, n_embd=TEXT_RSS_WIDTH, n_head=4)
    model = transformers.GPT2Model(config).eval()
    data = TextDataset(synthetic_texts(documents, max_words=48), ByteTokenizer(config.vocab_size), max_length=128)
    loader = DataLoader(data, batch_size=16, collate_fn=data.collate_fn)
    names = TEXT_RSS_NAMES
    work = Path(tempfile.mkdtemp(prefix="fxcapture-bench-rss-"))

    def hooks() -> None:  # the usual loop: real tokens of every key kept in lists, concatenated at the end
        kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        mask: list[torch.Tensor] = []
        handles = [model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: kept[n].append((o[0] if isinstance(o, tuple) else o)[mask[0]].bfloat16()))
        for n in names]  # fmt: skip
        with torch.inference_mode():
            for batch in loader:
                mask[:] = [batch["attention_mask"].bool()]
                model(**batch)
        for h in handles:
            h.remove()
        for n in names:
            kept[n] = torch.cat(kept[n])  # type: ignore[assignment]

    def extract() -> None:
        from fxcapture import extract as run

        run(model, names, loader, out=work / "o", reduce="tokens", dtype="bfloat16", progress=False)

    try:
        print(peak_above_start({"hooks": hooks, "extract": extract}[method]), int(data.lengths.sum()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_text_memory(args: argparse.Namespace) -> Table:
    """Peak RSS of storing tokens for about 10k and 100k real tokens, one process a cell."""
    small, large = (20, 200) if args.quick else (100, 1000)
    table = Table(
        f"text: peak RSS during the loop, GPT-2 4 layers x {TEXT_RSS_WIDTH}, {'/'.join(TEXT_RSS_NAMES)} stored per "
        "token in bfloat16 (cpu)",
        ["method", "small MiB", "large MiB", "growth MiB", "tokens (small / large)", "stored MiB (large)"],
    )
    for method in ("hooks", "extract"):
        cells = []
        for documents in (small, large):
            progress(f"cpu: text peak RSS of {method} for {documents} documents")
            options = ["--rss-text-child", method, str(documents), "--threads", str(args.threads)]
            cells.append(run_child(options, f"text {method} with {documents} documents"))
        (peak_s, tokens_s), (peak_l, tokens_l) = cells
        stored = tokens_l * len(TEXT_RSS_NAMES) * TEXT_RSS_WIDTH * 2  # bfloat16
        table.add(method, f"{peak_s / 2**20:.0f}", f"{peak_l / 2**20:.0f}", f"{(peak_l - peak_s) / 2**20:.0f}",
                  f"{tokens_s:,} / {tokens_l:,}", f"{stored / 2**20:.0f}")  # fmt: skip
    table.notes.append(
        "each cell is a separate process, peak resident memory during the loop above its start (sampled every "
        "millisecond); hooks keep the real tokens' rows in lists (bfloat16) and concatenate them; extract "
        "streams them to chunk files, so its peak does not grow with the number of tokens (the model is traced "
        "by running it on the first batch: that trace's peak varies by tens of MiB between processes)"
    )
    return table


def main(argv: list[str] | None = None) -> list[Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, batch_size=16, rounds=5)
    parser.add_argument("--arch", default="resnet50", help="torchvision model (default resnet50)")
    parser.add_argument("--samples", type=int, default=None, help="images per timed pass (default 128; 8 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (64 with --quick)")
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="dataset sizes of the peak RSS runs (default 64 1280; 8 80 with --quick)")
    parser.add_argument("--rss-image-size", type=int, default=None, help="default 128 (64 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak RSS table")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--text-windows", type=int, default=None,
                        help="text documents (about one window each) per timed pass (default 48; 8 with --quick)")
    parser.add_argument("--text-length", type=int, default=256, help="tokens per text window (default 256)")
    parser.add_argument("--text-batch", type=int, default=None, help="text windows per batch (default 8; 2 with --quick)")
    parser.add_argument("--no-text", action="store_true", help="skip the text table")
    parser.add_argument("--text-only", action="store_true", help="only the text table")
    parser.add_argument("--rss-child", nargs=2, metavar=("METHOD", "SAMPLES"), help=argparse.SUPPRESS)
    parser.add_argument("--rss-device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--rss-text-child", nargs=2, metavar=("METHOD", "DOCUMENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        args.rss_image_size = args.rss_image_size or 128
        args.batch_size = args.batch_size or 16
        rss_child(args.rss_child[0], int(args.rss_child[1]), args)
        return []
    if args.rss_text_child:
        text_rss_child(args.rss_text_child[0], int(args.rss_text_child[1]), args)
        return []
    args = finish_arguments(args)
    args.samples = args.samples or (8 if args.quick else 128)
    args.image_size = args.image_size or (64 if args.quick else 224)
    args.rss_sizes = args.rss_sizes or ([8, 80] if args.quick else [64, 1280])
    args.rss_image_size = args.rss_image_size or (64 if args.quick else 128)
    args.text_windows = args.text_windows or (8 if args.quick else 48)
    args.text_batch = args.text_batch or (2 if args.quick else 8)
    sections: list[Any] = []
    for device in devices(args.device):
        sections.append(header_line(args, device))
        if not args.text_only:
            sections.append(measure_throughput(device, args))
            if not args.no_memory:
                sections.append(measure_memory(device, args))
        if not args.no_text:
            sections.append(measure_text(device, args))
            if not args.no_memory and device.type == "cpu":
                sections.append(measure_text_memory(args))
    report("extract", sections, args.save)
    return [s for s in sections if isinstance(s, Table)]


if __name__ == "__main__":
    main()
