"""Capture under ``torch.compile``: compiled extractor vs compiled model, and pruning.

Two tables per device, every contender measured side by side (interleaved rounds):

1. The compiled (inductor) fxcapture extractor vs the compiled model, beside a compiled
   torchvision ``create_feature_extractor`` and a compiled copy of the model carrying
   forward hooks registered *before* compiling. The script also registers a hook *after*
   compiling and says whether it fired (pytorch#117758: such hooks are silently ignored
   while ``torch._dynamo.config.skip_nnmodule_hook_guards`` is on, the default).
   Target (issue 5): compiled extractor <= 1.03x the compiled model.
2. The pruned extractor, ``capture(resnet50, "layer2", keep_output=False)``, vs the full
   forward (eager): it should cost about the sub-graph up to layer2.

Inductor compiles take minutes on 2 CPU cores: sizes are modest by default (resnet18,
batch 8) and progress goes to stderr.

Usage::

    python benchmarks/compiled.py                        # resnet18, inductor, CPU (+ CUDA)
    python benchmarks/compiled.py --model resnet50 --save
    python benchmarks/compiled.py --quick --backend eager   # seconds: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `fxcapture` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
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
    progress,
    ratio,
    report,
    resnet18_workload,
    resnet50_workload,
    same_values,
    time_call,
    time_interleaved,
    vit_workload,
)

COMPILED_TARGET = 1.03  # issue 5: compiled extractor / compiled model
MODELS = {"resnet18": resnet18_workload, "resnet50": resnet50_workload, "vit": vit_workload}
COMPILED_HEADERS = ["model", "method", "compile s", "graphs", "median ms", "best ms",
                    "x compiled model", "x eager model", "hooks fired", "close to eager"]  # fmt: skip
PRUNED_HEADERS = ["model", "method", "captured", "build s", "median ms", "best ms", "x full forward", "same values"]


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def close(a: Any, b: Any) -> bool:
    """Compiled kernels reorder float sums: compare with a tolerance, structure exactly."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-3) for x, y in zip(a, b)
    )


def compile_contenders(wl: Workload, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    """Compile the model, the extractors and a hooked copy; run each once (the compile)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from fxcapture import capture

    x = wl.inputs
    hooked = HookCapture(wl.model, wl.hook_paths)  # hooks registered before compiling
    # dynamo caches compiled code per code object and (skip_nnmodule_hook_guards) does not
    # guard on hooks: the hooked copy would silently reuse the compiled model's graph and
    # never run its hooks. Its own class gives it its own graph, as a lone model would get.
    cls = type(hooked.model)
    hooked.model.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__})
    compiled_hooked = torch.compile(hooked.model, backend=args.backend)

    def run_hooked() -> tuple[Any, dict[str, Any]]:
        hooked.store = {}
        return compiled_hooked(*x), hooked.store

    full = dict(backend=args.backend, fullgraph=True)
    model_c = torch.compile(wl.model, **full)
    fx_c = torch.compile(capture(wl.model, wl.fx_names), **full)
    tv_c = torch.compile(create_feature_extractor(wl.model, wl.tv_return_nodes()), **full)
    calls = {
        "compiled model": lambda: model_c(*x),
        "compiled fxcapture": lambda: fx_c(*x),
        "compiled torchvision": lambda: tv_c(*x),
        "compiled hooks": run_hooked,
    }
    result: dict[str, dict[str, Any]] = {}
    for name, call in calls.items():
        progress(f"{wl.name} on {device}: compiling {name} ({args.backend})")
        graphs = unique_graphs()
        seconds, value = time_call(call, device)
        result[name] = {"call": call, "compile_s": seconds, "graphs": unique_graphs() - graphs, "first": value}
    result["compiled hooks"]["hooked"] = hooked
    return result


def hook_after_compile_fires(call: Any, module: torch.nn.Module, device: torch.device) -> tuple[bool, float]:
    """Register a forward hook on ``module`` after compiling; does the compiled call run it?"""
    fired: list[bool] = []
    handle = module.register_forward_hook(lambda *_: fired.append(True))
    try:
        seconds, _ = time_call(call, device)
    finally:
        handle.remove()
    return bool(fired), seconds


def hooked_copy_fires(wl: Workload, args: argparse.Namespace, device: torch.device) -> tuple[bool, float]:
    """Compile a hooked deepcopy of an already compiled model: does its hook run?

    Dynamo keys compiled code by code object and by default does not guard on hooks,
    so the copy can reuse the model's graph (no compile: a fast first call) and skip them.
    """
    twin = copy.deepcopy(wl.model)
    fired: list[bool] = []
    twin.get_submodule(wl.hook_paths[-1]).register_forward_hook(lambda *_: fired.append(True))
    compiled = torch.compile(twin, backend=args.backend)
    progress(f"{wl.name} on {device}: compiling a hooked copy of the model")
    seconds, _ = time_call(lambda: compiled(*wl.inputs), device)
    return bool(fired), seconds


def measure_compiled(wl: Workload, device: torch.device, args: argparse.Namespace, table: Table) -> None:
    wl.to(device)
    x = wl.inputs
    with torch.no_grad():
        eager_out = wl.model(*x)
        reference = HookCapture(wl.model, wl.hook_paths)  # eager hooks: the independent reference
        _, eager_feats = reference(*x)
        reference.remove()
        eager_feats = list(eager_feats.values())
        compiled = compile_contenders(wl, args, device)

        first = {name: c["first"] for name, c in compiled.items()}
        ok = {
            "eager model": True,
            "compiled model": close([first["compiled model"]], [eager_out]),
            "compiled fxcapture": close([first["compiled fxcapture"][0]], [eager_out])
            and close(first["compiled fxcapture"][1].values(), eager_feats),
            "compiled torchvision": close(wl.tv_features(first["compiled torchvision"]), eager_feats),
            "compiled hooks": close([first["compiled hooks"][0]], [eager_out])
            and close(first["compiled hooks"][1].values(), eager_feats),
        }
        hooks_fired = {"compiled hooks": f"{len(first['compiled hooks'][1])}/{len(wl.hook_paths)} (registered before compile)"}

        contenders = {"eager model": lambda: wl.model(*x)}
        contenders.update({name: c["call"] for name, c in compiled.items()})
        progress(f"{wl.name} on {device}: timing {args.rounds} rounds")
        t = time_interleaved(contenders, args.rounds, iters=args.iters, device=device)

        # pytorch#117758: a hook added after compiling; the model's modules are shared
        # with the compiled extractors, so this runs after the timing.
        last = wl.hook_paths[-1]
        fired, seconds = hook_after_compile_fires(compiled["compiled model"]["call"], wl.model.get_submodule(last), device)
        hooks_fired["compiled model"] = (
            f"{'yes' if fired else 'NO: silently dropped'} (hook on {last} registered after compile; "
            f"call took {seconds:.2f} s)"
        )
        fired_copy, seconds_copy = hooked_copy_fires(wl, args, device)
    compiled["compiled hooks"]["hooked"].remove()
    table.notes.append(
        f"{wl.name}: a deepcopy of the model with a hook on {last}, compiled after the model itself: "
        f"hook fired {'yes' if fired_copy else 'NO: silently dropped'} (first call {seconds_copy:.2f} s); "
        "the `compiled hooks` row uses a copy of its own class so that it gets its own graph"
    )
    for name in contenders:
        c = compiled.get(name, {})
        table.add(
            wl.name, name, fmt_s(c.get("compile_s")), c.get("graphs", "-"), fmt_ms(t[name].median),
            fmt_ms(t[name].best), fmt_ratio(ratio(t, name, "compiled model")), fmt_ratio(ratio(t, name, "eager model")),
            hooks_fired.get(name, "-"), "yes" if ok[name] else "NO",
        )  # fmt: skip
    fx = ratio(t, "compiled fxcapture", "compiled model")
    table.notes.append(
        f"{wl.name}: compiled fxcapture x compiled model {fx:.3f} "
        f"(target <= {COMPILED_TARGET}: {'met' if fx <= COMPILED_TARGET else 'not met'}), "
        f"x compiled torchvision {ratio(t, 'compiled fxcapture', 'compiled torchvision'):.3f}: the compiled "
        "model frees what the extractors return, so the cost of keeping the values is in both"
    )
    wl.to(torch.device("cpu"))


def measure_pruned(device: torch.device, args: argparse.Namespace) -> Table:
    """capture(resnet50, "layer2", keep_output=False) vs the full forward, eager."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from fxcapture import capture

    table = Table(f"Pruned extractor, eager ({device.type})", PRUNED_HEADERS)
    wl = resnet50_workload(args.batch_size, args.quick).to(device)
    model, x = wl.model, wl.inputs
    builders = {
        "fxcapture keep_output=False": lambda: capture(model, ["layer2"], keep_output=False),
        "torchvision (prunes by design)": lambda: create_feature_extractor(model, ["layer2"]),
        "fxcapture keep_output=True": lambda: capture(model, ["layer2"]),
    }
    built = {name: time_call(build) for name, build in builders.items()}
    progress(f"{wl.name} on {device}: pruned extractor, timing {args.rounds} rounds")
    with torch.no_grad():
        reference = HookCapture(model, ["layer2"])
        full_out, ref = reference(*x)
        reference.remove()
        pruned_out, pruned = built["fxcapture keep_output=False"][1](*x)
        full_fx_out, full_fx = built["fxcapture keep_output=True"][1](*x)
        ok = {
            "full forward": True,
            "fxcapture keep_output=False": pruned_out is None and same_values(pruned.values(), ref.values()),
            "torchvision (prunes by design)": same_values(built["torchvision (prunes by design)"][1](*x).values(), ref.values()),
            "fxcapture keep_output=True": torch.equal(full_fx_out, full_out) and same_values(full_fx.values(), ref.values()),
        }
        contenders = {"full forward": lambda: model(*x)}
        contenders.update({name: (lambda ex=ex: ex(*x)) for name, (_, ex) in built.items()})
        t = time_interleaved(contenders, args.rounds, iters=args.iters, device=device)
    for name in contenders:
        build = built[name][0] if name in built else None
        table.add(
            wl.name, name, "-" if name == "full forward" else "layer2", fmt_s(build), fmt_ms(t[name].median),
            fmt_ms(t[name].best), fmt_ratio(ratio(t, name, "full forward")), "yes" if ok[name] else "NO",
        )  # fmt: skip
    table.notes.append("keep_output=False: the graph is cut after layer2 and `out` is None")
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, batch_size=8, rounds=15)
    parser.add_argument("--model", default="resnet18", choices=sorted(MODELS),
                        help="model of the compiled table (default resnet18; layer1-4 + fc, or the ViT's attention maps)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--skip-pruned", action="store_true", help="leave out the pruned-extractor table")
    return finish_arguments(parser.parse_args(argv))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[Table]:
    """Run the benchmark; print (and with ``--save`` write) the tables; return them."""
    args = parse_args(argv)
    sections: list[str | Table] = []
    tables: list[Table] = []
    for device in devices(args.device):
        torch._dynamo.reset()
        table = Table(f"Compiled ({args.backend}) extractor vs compiled model ({device.type})", COMPILED_HEADERS)
        table.notes.append(
            "x compiled model / x eager model: median over interleaved rounds; compile s: the first call; "
            "graphs: graphs dynamo compiled for it (1 = no graph break); close to eager: allclose(1e-3) to eager"
        )
        measure_compiled(MODELS[args.model](args.batch_size, args.quick), device, args, table)
        device_tables = [table] if args.skip_pruned else [table, measure_pruned(device, args)]
        sections.append(header_line(args, device) + f", backend {args.backend}")
        sections += device_tables
        tables += device_tables
    report("compiled", sections, args.save)
    return tables


if __name__ == "__main__":
    main()
