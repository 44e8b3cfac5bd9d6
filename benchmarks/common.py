"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, tables.

Timings on a shared CPU swing by 10-30% from one second to the next, so every script
measures its contenders *interleaved*: each round runs every contender once (in a
rotated order), and ratios are taken per round and then summarised by their median.
Noise only ever adds time, so the best round of each contender is printed as well.

Example::

    >>> timings = time_interleaved({"plain": lambda: model(x), "ex": lambda: ex(x)}, rounds=9)
    >>> ratio(timings, "ex", "plain")       # median over rounds of ex_i / plain_i
    1.01
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- command line ------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, batch_size: int = 8, rounds: int = 15) -> None:
    """The flags every benchmark script has."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and inputs, few rounds: checks that the script works")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"],
                        help="auto: cpu, plus cuda when available (default)")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {batch_size} (2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved timing rounds (default {rounds}, 3 with --quick)")
    parser.add_argument("--iters", type=int, default=1, help="calls per contender per round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--save", action="store_true",
                        help="also write the tables to benchmarks/results/<script>.md")
    parser.set_defaults(default_batch_size=batch_size, default_rounds=rounds)  # fmt: skip


def finish_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the size defaults that depend on ``--quick`` and apply ``--threads``."""
    if args.batch_size is None:
        args.batch_size = 2 if args.quick else args.default_batch_size
    if args.rounds is None:
        args.rounds = 3 if args.quick else args.default_rounds
    if args.batch_size < 1 or args.rounds < 1 or args.iters < 1:
        raise SystemExit("--batch-size, --rounds and --iters must be >= 1")
    torch.set_num_threads(args.threads)
    return args


def devices(choice: str) -> list[torch.device]:
    """``auto``: CPU plus CUDA when available; ``cuda`` without a GPU is an error."""
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    if choice == "cpu":
        return [torch.device("cpu")]
    if choice == "cuda":
        return [torch.device("cuda")]
    return [torch.device("cpu")] + ([torch.device("cuda")] if has_cuda else [])


def progress(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- timing ------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of one contender, one entry per round."""

    name: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def time_interleaved(
    contenders: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    iters: int = 1,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Time every contender once per round, rotating the order between rounds.

    Each call's result is dropped before the next call, so no contender pays for the
    memory of an earlier one. Example::

        >>> t = time_interleaved({"a": f, "b": g}, rounds=5)
        >>> t["a"].median, t["b"].best
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    synchronize(device)
    timings = {name: Timing(name) for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = contenders[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            timings[name].times.append((time.perf_counter() - start) / iters)
    return timings


def ratio(timings: dict[str, Timing], name: str, reference: str) -> float:
    """Median over rounds of ``name / reference`` (both timed in the same round)."""
    a, b = timings[name].times, timings[reference].times
    return statistics.median(x / y for x, y in zip(a, b))


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """Seconds one call takes, and its result (build and compile times)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_builds(builders: dict[str, Callable[[], Any]], repeats: int = 3) -> dict[str, tuple[float, Any]]:
    """Median seconds of each builder over ``repeats`` interleaved builds, and its last product.

    Example::

        >>> builds = time_builds({"fx": lambda: capture(m, "layer4")})
        >>> seconds, extractor = builds["fx"]
    """
    times: dict[str, list[float]] = {name: [] for name in builders}
    built: dict[str, Any] = {}
    for _ in range(repeats):
        for name, build in builders.items():
            seconds, built[name] = time_call(build)
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), built[name]) for name in builders}


# -- memory ------------------------------------------------------------------------
def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    The result of the call stays alive until the call returns, so the captured values
    count. CUDA: the caching allocator's peak. CPU: replayed from the profiler's
    allocation events (each op's own allocations at its start, frees when they happen).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def mib(nbytes: int | float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


# -- reference capture with forward hooks --------------------------------------------
class HookCapture:
    """TorchHook-style capture: forward hooks on a *copy* of the model keep module outputs.

    The copy keeps the hooks away from the other contenders, which share the model's
    submodules. ``fn(x)`` returns ``(output, {path: value})`` like an extractor.
    """

    def __init__(self, model: torch.nn.Module, paths: Sequence[str], *, copy_model: bool = True) -> None:
        self.model = copy.deepcopy(model) if copy_model else model
        self.paths = list(paths)
        self.store: dict[str, Any] = {}
        self.handles = [
            self.model.get_submodule(path).register_forward_hook(self._hook(path))
            for path in self.paths
        ]

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.store[path] = output

        return hook

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.store = {}
        out = self.model(*args, **kwargs)
        return out, self.store

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def same_values(a: Iterable[Any], b: Iterable[Any]) -> bool:
    """True if both sequences hold equal tensors (or equal nested tuples/lists/dicts)."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        return x.shape == y.shape and torch.equal(x.cpu(), y.cpu())
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return same_values(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return list(x) == list(y) and same_values(x.values(), y.values())
    if hasattr(x, "to_tuple") and hasattr(y, "to_tuple"):  # transformers ModelOutput
        return same_values(x.to_tuple(), y.to_tuple())
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return _equal(torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y)))
    return x == y


# -- tables ------------------------------------------------------------------------
@dataclass
class Table:
    """A titled markdown table with notes under it."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.headers)} columns")
        self.rows.append([str(c) for c in cells])

    def column(self, header: str) -> list[str]:
        i = self.headers.index(header)
        return [row[i] for row in self.rows]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", markdown_table(self.headers, self.rows)]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table with padded columns."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]])


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.3f}"


def header_line(args: argparse.Namespace, device: torch.device | str | None = None) -> str:
    """One line saying what was measured where."""
    parts = [f"torch {torch.__version__}"]
    for module in ("torchvision", "timm", "transformers"):
        mod = sys.modules.get(module)
        if mod is not None:
            parts.append(f"{module} {getattr(mod, '__version__', '?')}")
    parts.append(f"python {platform.python_version()}")
    if device is not None:
        parts.append(f"device {describe_device(torch.device(device))}")
    parts += [f"threads {torch.get_num_threads()}", f"batch {args.batch_size}",
              f"rounds {args.rounds} x {args.iters} call(s)"]  # fmt: skip
    if args.quick:
        parts.append("QUICK (tiny sizes, not for the README)")
    return ", ".join(parts)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def report(script: str, sections: list[str | Table], save: bool) -> str:
    """Print the sections (header lines and tables) and write them when ``save``."""
    text = "\n\n".join(s.markdown() if isinstance(s, Table) else s for s in sections) + "\n"
    print(text, flush=True)
    if save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{script}.md"
        path.write_text(f"# {script}.py\n\n{text}")
        progress(f"wrote {path}")
    return text


# -- the models every script measures ----------------------------------------------
@dataclass
class Workload:
    """One model, one input and what is captured from it, for every method alike.

    ``fx_names`` are fxcapture selectors, ``tv_nodes`` torchvision return nodes (the
    model output node is added so that every method computes the whole forward),
    ``hook_paths`` the modules a forward hook sits on. All three select the same
    values, in the same order.
    """

    name: str
    captured: str
    model: torch.nn.Module
    inputs: tuple
    fx_names: list[str]
    tv_nodes: list[str]
    hook_paths: list[str]
    output_node: str | None = None  # torchvision's name of the model output, if extra
    local: str | None = None  # the local variable captured, for get_local-style tools
    local_owner: type | None = None  # the class whose forward holds that local
    key: str = ""  # how to build it again: WORKLOADS[key](batch_size, quick)

    def to(self, device: torch.device) -> "Workload":
        self.model.to(device)
        self.inputs = tuple(x.to(device) for x in self.inputs)
        return self

    def tv_return_nodes(self) -> list[str]:
        return self.tv_nodes + ([self.output_node] if self.output_node else [])

    def tv_features(self, result: dict[str, Any]) -> list[Any]:
        """The captured values of a torchvision extractor's dict, output node left out."""
        return [v for k, v in result.items() if k != self.output_node or k in self.tv_nodes]


def resnet_workload(batch_size: int, quick: bool = False, arch: str = "resnet50") -> Workload:
    """torchvision ``arch`` (random weights), capturing layer1-4 and fc."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    size = 64 if quick else 224
    names = ["layer1", "layer2", "layer3", "layer4", "fc"]
    return Workload(
        key=arch,
        name=arch + (f" @{size}px" if quick else ""),
        captured="layer1-4 + fc",
        model=model,
        inputs=(torch.randn(batch_size, 3, size, size),),
        fx_names=names,
        tv_nodes=names,
        hook_paths=names,
    )


def vit_workload(batch_size: int, quick: bool = False) -> Workload:
    """timm vit_small_patch16_224 with ``fused_attn=False``, capturing every attention map.

    fxcapture takes the local ``attn`` of each ``Attention.forward``; its final value is
    the output of ``attn_drop``, so torchvision returns the ``attn_drop`` nodes and the
    hooks sit on the ``attn_drop`` modules.
    """
    import timm
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 2} if quick else {}
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    blocks = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False
            blocks += 1
    paths = [f"blocks.{i}.attn.attn_drop" for i in range(blocks)]
    size = kwargs.get("img_size", 224)
    return Workload(
        key="vit",
        name="vit_small_patch16_224" + (f" @{size}px depth {blocks}" if quick else ""),
        captured=f"{blocks} attention maps",
        model=model,
        inputs=(torch.randn(batch_size, 3, size, size),),
        fx_names=["attn"],
        tv_nodes=paths,
        hook_paths=paths,
        output_node="head",
        local="attn",
        local_owner=Attention,
    )


def resnet50_workload(batch_size: int, quick: bool = False) -> Workload:
    return resnet_workload(batch_size, quick, "resnet50")


def resnet18_workload(batch_size: int, quick: bool = False) -> Workload:
    return resnet_workload(batch_size, quick, "resnet18")


WORKLOADS = {"resnet50": resnet50_workload, "vit": vit_workload}
