"""fxcapture against every peer: same models, same inputs, same captured values, one run.

Methods, for resnet50 (layer1-4 + fc) and timm vit_small_patch16_224 (every attention
map, ``fused_attn=False``):

- ``plain``: the model's forward, nothing captured;
- ``fxcapture``: ``capture(model, names)``;
- ``torchvision``: ``create_feature_extractor`` on the same nodes (plus the output node);
- ``hooks``: TorchHook-style forward hooks that keep the module outputs;
- ``get_local``: AnyCapture-style decorator on ``Attention.forward`` (fxcapture's own
  port, ``fxcapture.get_local``; locals only, so n/a on resnet50);
- ``TorchLens``: ``torchlens.trace`` saving the same modules, when installed (the
  ``bench`` extra). TorchLens wraps every torch function when imported, which slows every
  other method in the process, so it runs in a subprocess of its own that times the
  plain forward before importing it and TorchLens after.

Columns: ratio to plain (median over interleaved rounds), build time, peak memory of one
call (the captured values included), and what each method supports: local variables,
``torch.compile``, models that torch.fx cannot trace ("fallback").

Usage::

    python benchmarks/peers.py                  # batch 8, 2 threads, CPU (+ CUDA if present)
    python benchmarks/peers.py --quick          # tiny sizes: checks the script works
    python benchmarks/peers.py --no-torchlens --save
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `fxcapture` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    WORKLOADS,
    HookCapture,
    Table,
    Workload,
    add_common_arguments,
    devices,
    finish_arguments,
    fmt_ms,
    fmt_ratio,
    fmt_s,
    header_line,
    mib,
    peak_memory,
    progress,
    ratio,
    report,
    same_values,
    time_builds,
    time_call,
    time_interleaved,
)
from fxcapture import capture, get_local  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

HEADERS = ["model", "method", "x plain", "median ms", "build s", "peak MiB",
           "locals", "compile", "fallback", "same values"]  # fmt: skip
METHODS = ["plain", "fxcapture", "torchvision", "hooks", "get_local", "TorchLens"]


def supports(method: str) -> tuple[str, str, str]:
    """(locals, compile, fallback) for a method: what it can do, from its design and docs."""
    return {
        "fxcapture": ("yes", "yes (1 graph)", "yes"),
        "plain": ("-", "-", "-"),
        "torchvision": ("no (fx nodes)", "yes", "no"),
        "hooks": ("no", "partial (hooks added after compile are dropped)", "yes"),
        "get_local": ("yes", "no (run-time capture)", "yes"),
        "TorchLens": ("no (ops, modules)", "no", "yes"),
    }[method]


# -- in-process methods ------------------------------------------------------------------
class GetLocalCapture:
    """AnyCapture-style ``get_local`` on a copy of the model: ``Attention.forward`` decorated.

    The copy's attention modules get a subclass whose forward is the decorated original, so
    neither the user's model nor the original class is touched.
    """

    def __init__(self, wl: Workload) -> None:
        if wl.local is None or wl.local_owner is None:
            raise LookupError("get_local captures locals; this workload captures module outputs")
        self.get_local = get_local
        get_local.activate()
        owner = wl.local_owner
        decorated = type(owner.__name__, (owner,), {
            "forward": get_local(wl.local)(owner.forward), "__module__": owner.__module__,
        })  # fmt: skip
        self.model = copy.deepcopy(wl.model)
        for module in self.model.modules():
            if type(module) is owner:
                module.__class__ = decorated
        self.suffix = "." + wl.local

    def __call__(self, *args: Any) -> tuple[Any, dict[str, Any]]:
        self.get_local.clear()
        out = self.model(*args)
        values = {
            f"{key}@{i}": value
            for key, values in self.get_local.cache.items()
            if key.endswith(self.suffix)
            for i, value in enumerate(values)
        }
        return out, values

    def close(self) -> None:
        self.get_local.clear()
        self.get_local.deactivate()


def build_methods(wl: Workload, args: argparse.Namespace) -> tuple[dict[str, Callable], dict[str, float], dict[str, str]]:
    """Build every in-process method; return calls, build seconds and why some are n/a."""
    hooked_model = copy.deepcopy(wl.model)
    last_hooks: list[HookCapture] = []

    def build_hooks() -> HookCapture:
        for previous in last_hooks:
            previous.remove()
        last_hooks[:] = [HookCapture(hooked_model, wl.hook_paths, copy_model=False)]
        return last_hooks[0]

    builds = time_builds(
        {
            "fxcapture": lambda: capture(wl.model, wl.fx_names),
            "torchvision": lambda: create_feature_extractor(wl.model, wl.tv_return_nodes()),
            "hooks": build_hooks,
        },
        repeats=2 if args.quick else 3,
    )
    x = wl.inputs
    built = {name: product for name, (_, product) in builds.items()}
    calls: dict[str, Callable] = {
        "plain": lambda: wl.model(*x),
        "fxcapture": lambda: built["fxcapture"](*x),
        "torchvision": lambda: built["torchvision"](*x),
        "hooks": lambda: built["hooks"](*x),
    }
    build_s = {name: seconds for name, (seconds, _) in builds.items()}
    missing: dict[str, str] = {}
    try:
        build_s["get_local"], get_local = time_call(lambda: GetLocalCapture(wl))
        calls["get_local"] = lambda: get_local(*x)
    except LookupError as err:  # a workload without locals
        missing["get_local"] = str(err)
    return calls, build_s, missing


def features_of(method: str, wl: Workload, result: Any) -> list[Any]:
    if method == "torchvision":
        return wl.tv_features(result)
    return list(result[1].values())


def measure_workload(wl: Workload, device: torch.device, args: argparse.Namespace, table: Table) -> None:
    progress(f"{wl.name} on {device}: building")
    wl.to(device)
    calls, build_s, missing = build_methods(wl, args)
    x = wl.inputs
    with torch.no_grad():
        plain = wl.model(*x)
        reference = features_of("hooks", wl, calls["hooks"]())
        ok = {"plain": True}
        for name in calls:
            if name != "plain":
                result = calls[name]()
                out_ok = name == "torchvision" or torch.equal(result[0], plain)
                ok[name] = out_ok and same_values(features_of(name, wl, result), reference)
        progress(f"{wl.name} on {device}: timing {args.rounds} rounds of {', '.join(calls)}")
        t = time_interleaved(calls, args.rounds, iters=args.iters, device=device)
        progress(f"{wl.name} on {device}: peak memory")
        peaks = {name: peak_memory(call, device) for name, call in calls.items()}
    for name in METHODS:
        if name == "TorchLens":
            continue
        if name in missing:
            table.add(wl.name, name, "n/a", "n/a", "n/a", "n/a", *supports(name), f"n/a: {missing[name]}")
            continue
        table.add(
            wl.name, name, fmt_ratio(ratio(t, name, "plain")), fmt_ms(t[name].median), fmt_s(build_s.get(name)),
            mib(peaks[name]), *supports(name), "yes" if ok[name] else "NO",
        )  # fmt: skip
    if args.torchlens:
        add_torchlens_row(wl, device, args, table)
    wl.to(torch.device("cpu"))


# -- TorchLens, in a subprocess ---------------------------------------------------------------
def torchlens_installed() -> bool:
    return importlib.util.find_spec("torchlens") is not None


def add_torchlens_row(wl: Workload, device: torch.device, args: argparse.Namespace, table: Table) -> None:
    if not torchlens_installed():
        table.add(wl.name, "TorchLens", "n/a", "n/a", "n/a", "n/a", *supports("TorchLens"),
                  'n/a: not installed (pip install "fxcapture[bench]")')  # fmt: skip
        return
    spec = {
        "workload": wl.key, "batch_size": args.batch_size, "quick": args.quick, "device": str(device),
        "rounds": max(1, min(args.rounds, 3)), "threads": args.threads,
    }  # fmt: skip
    progress(f"{wl.name} on {device}: TorchLens in a subprocess ({spec['rounds']} rounds)")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--torchlens-worker", json.dumps(spec)],
        capture_output=True, text=True, cwd=root, env=env, timeout=args.torchlens_timeout,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:150]
        table.add(wl.name, "TorchLens", "n/a", "n/a", "n/a", "n/a", *supports("TorchLens"), f"n/a: failed: {reason}")
        return
    r = json.loads(lines[-1])
    table.add(
        wl.name, "TorchLens", fmt_ratio(r["ratio"]), fmt_ms(r["median"]), "n/a (none)", mib(r["peak"]),
        *supports("TorchLens"), r["same_values"],
    )  # fmt: skip
    table.notes.append(
        f"{wl.name}: TorchLens {r['version']} timed in its own process against that process's plain "
        f"forward ({fmt_ms(r['plain_median'])} ms, measured before importing torchlens); first call "
        f"{r['first_call']:.2f} s"
    )


def torchlens_values(trace: Any, paths: Sequence[str]) -> list[Any]:
    """The saved output of each module; by module first (``fc`` is also the model output)."""
    values = []
    for path in paths:
        try:
            values.append(trace.modules[path].out)
        except Exception:
            values.append(trace[path].out)
    return values


def torchlens_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time plain (before importing torchlens) and torchlens.trace; check values vs hooks."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    wl = WORKLOADS[spec["workload"]](spec["batch_size"], spec["quick"]).to(device)
    x, rounds = wl.inputs, spec["rounds"]
    with torch.no_grad():
        hooks = HookCapture(wl.model, wl.hook_paths)
        _, reference = hooks(*x)
        reference = list(reference.values())
        hooks.remove()
        plain = time_interleaved({"plain": lambda: wl.model(*x)}, rounds, device=device)["plain"]

        import torchlens
        from torchlens.options import CaptureOptions

        options = CaptureOptions(layers_to_save=list(wl.hook_paths), unwrap_when_done=True)
        call = lambda: torchlens.trace(wl.model, list(x), capture=options)  # noqa: E731
        first, trace = time_call(call, device)
        try:
            ok = "yes" if same_values(torchlens_values(trace, wl.hook_paths), reference) else "NO"
        except Exception as err:
            ok = f"n/a: lookup failed: {type(err).__name__}"
        del trace
        timed = time_interleaved({"tl": call}, rounds, warmup=0, device=device)["tl"]
        peak = peak_memory(call, device)
    return {
        "version": getattr(torchlens, "__version__", "?"), "median": timed.median,
        "plain_median": plain.median, "ratio": statistics.median(timed.times) / plain.median,
        "first_call": first, "peak": peak, "same_values": ok,
    }  # fmt: skip


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, batch_size=8, rounds=15)
    parser.add_argument("--models", default="resnet50,vit", help="comma-separated subset of resnet50, vit")
    parser.add_argument("--no-torchlens", dest="torchlens", action="store_false",
                        help="leave TorchLens out even when it is installed")
    parser.add_argument("--torchlens-timeout", type=int, default=1800, help="seconds for the TorchLens subprocess")
    parser.add_argument("--torchlens-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torchlens_worker is not None:
        return args
    args = finish_arguments(args)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown --models {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    return args  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[Table]:
    """Run the benchmark; print (and with ``--save`` write) the tables; return them."""
    args = parse_args(argv)
    if args.torchlens_worker is not None:
        print(json.dumps(torchlens_worker(json.loads(args.torchlens_worker))), flush=True)
        return []
    sections: list[str | Table] = []
    tables: list[Table] = []
    for device in devices(args.device):
        table = Table(f"fxcapture and its peers ({device.type})", HEADERS)
        table.notes += [
            "x plain: median over interleaved rounds of method / plain forward; peak MiB: peak memory "
            "allocated during one call above what was allocated before, the returned values included",
            "same values: output equal to the plain forward's (torchvision returns the dict only) and "
            "captured values torch.equal to what forward hooks record",
            "locals / compile / fallback: captures local variables by name / works under torch.compile / "
            "works on models torch.fx cannot trace",
        ]
        for name in args.models:
            measure_workload(WORKLOADS[name](args.batch_size, args.quick), device, args, table)
        sections += [header_line(args, device), table]
        tables.append(table)
    report("peers", sections, args.save)
    return tables


if __name__ == "__main__":
    main()
