"""Overhead of capturing intermediates: plain forward vs fxcapture vs torchvision vs hooks.

One table per device, every contender measured side by side in one run (interleaved
rounds, see ``common.py``):

- resnet50, layer1-4 + fc (small features: the cost should be within 1-2% of plain);
- timm vit_small_patch16_224 with ``fused_attn=False``, all 12 attention maps (large
  features: any method must keep them alive, so the fair reference is forward hooks
  that keep exactly the same tensors, column ``x hooks``);
- GPT-2 (small config, random weights) through ``capture(..., fallback="auto")`` when
  fxcapture has it: the run-time fallback's overhead (issue 4: target <= 1.10).

Usage::

    python benchmarks/overhead.py                 # batch 8, 2 threads, CPU (+ CUDA if present)
    python benchmarks/overhead.py --quick         # tiny sizes: checks the script works
    python benchmarks/overhead.py --save          # also write benchmarks/results/overhead.md
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
from pathlib import Path
from typing import Any, Sequence

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
    progress,
    ratio,
    report,
    same_values,
    time_builds,
    time_call,
    time_interleaved,
)

HEADERS = ["model", "captured", "method", "build s", "median ms", "best ms", "x plain", "x hooks", "same values"]
METHODS = ["plain", "fxcapture", "torchvision", "hooks"]
FX_TARGET = 1.02  # issue 3: fxcapture / plain forward
FALLBACK_TARGET = 1.10  # issue 4: fallback / plain forward on GPT-2


def build_contenders(wl: Workload, build_repeats: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Build fxcapture, torchvision and hook extractors of ``wl`` (interleaved), timing each."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from fxcapture import capture

    hooked_model = copy.deepcopy(wl.model)  # hooks must not fire inside the other contenders
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
        repeats=build_repeats,
    )
    built = {name: product for name, (_, product) in builds.items()}
    return built, {name: seconds for name, (seconds, _) in builds.items()}


def check_values(wl: Workload, built: dict[str, Any]) -> dict[str, bool]:
    """Does every method return the plain output and the very values fxcapture returns?"""
    x = wl.inputs
    plain = wl.model(*x)
    out, feats = built["fxcapture"](*x)
    hook_out, hook_feats = built["hooks"](*x)
    tv_feats = wl.tv_features(built["torchvision"](*x))
    reference = list(hook_feats.values())  # forward hooks: the independent reference
    return {
        "plain": True,
        "fxcapture": torch.equal(out, plain) and same_values(feats.values(), reference),
        "torchvision": same_values(tv_feats, reference),
        "hooks": torch.equal(hook_out, plain) and len(reference) == len(feats),
    }


def measure_workload(wl: Workload, device: torch.device, args: argparse.Namespace, table: Table) -> None:
    progress(f"{wl.name} on {device}: building")
    wl.to(device)
    built, build_s = build_contenders(wl, build_repeats=2 if args.quick else 3)
    x = wl.inputs
    with torch.no_grad():
        ok = check_values(wl, built)
        contenders = {
            "plain": lambda: wl.model(*x),
            "fxcapture": lambda: built["fxcapture"](*x),
            "torchvision": lambda: built["torchvision"](*x),
            "hooks": lambda: built["hooks"](*x),
        }
        progress(f"{wl.name} on {device}: timing {args.rounds} rounds")
        timings = time_interleaved(contenders, args.rounds, iters=args.iters, device=device)
    built["hooks"].remove()
    for method in METHODS:
        t = timings[method]
        table.add(
            wl.name, wl.captured, method, fmt_s(build_s.get(method)), fmt_ms(t.median), fmt_ms(t.best),
            fmt_ratio(ratio(timings, method, "plain")), fmt_ratio(ratio(timings, method, "hooks")),
            "yes" if ok[method] else "NO",
        )  # fmt: skip
    fx = ratio(timings, "fxcapture", "plain")
    table.notes.append(
        f"{wl.name}: fxcapture x plain {fx:.3f} (target <= {FX_TARGET}: {'met' if fx <= FX_TARGET else 'not met'}), "
        f"x hooks {ratio(timings, 'fxcapture', 'hooks'):.3f}; build {build_s['fxcapture']:.3f} s vs torchvision "
        f"{build_s['torchvision']:.3f} s ({'met' if build_s['fxcapture'] <= build_s['torchvision'] else 'not met'})"
    )
    wl.to(torch.device("cpu"))


# -- GPT-2 through the run-time fallback (issue 4) -------------------------------------
def fallback_available() -> bool:
    from fxcapture import capture

    return "fallback" in inspect.signature(capture).parameters


def gpt2_model(quick: bool) -> torch.nn.Module:
    """GPT-2 small (124M, random weights), eager attention; 2 tiny layers with ``quick``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    sizes = dict(n_layer=2, n_embd=64, n_head=2, n_positions=64) if quick else {}
    config = GPT2Config(**sizes)
    config._attn_implementation = "eager"
    try:
        model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    except (AttributeError, TypeError):
        model = GPT2LMHeadModel(config)
    return model.eval()


def measure_fallback(device: torch.device, args: argparse.Namespace) -> Table:
    headers = ["model", "captured", "method", "build s", "first call s", "median ms", "best ms", "x plain", "x reference", "same values"]
    table = Table(f"GPT-2 through the run-time fallback ({device.type})", headers)
    if not fallback_available():
        table.add("gpt2", "-", "n/a: fallback not available", *["n/a"] * 7)
        table.notes.append("capture() has no `fallback=` parameter yet (issue 4)")
        return table
    try:
        _measure_fallback(device, args, table)
    except Exception as err:  # a benchmark reports what broke instead of hiding the other tables
        reason = (str(err).splitlines() or [""])[0][:120]
        table.add("gpt2", "-", f"n/a: {type(err).__name__}: {reason}", *["n/a"] * 7)
    return table


def _measure_fallback(device: torch.device, args: argparse.Namespace, table: Table) -> None:
    from fxcapture import capture

    model = gpt2_model(args.quick).to(device)
    seq = 16 if args.quick else 128
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, seq), device=device)
    layers = [f"transformer.h.{i}" for i in range(model.config.n_layer)]
    progress(f"gpt2 on {device}: building")
    builds = time_builds(
        {
            "attn_weights": lambda: capture(model, ["attn_weights"], fallback="auto"),
            "blocks": lambda: capture(model, layers, fallback="auto"),
        },
        repeats=2,
    )
    ex_attn, ex_blocks = builds["attn_weights"][1], builds["blocks"][1]
    hooks = HookCapture(model, layers)
    with torch.no_grad():
        plain = model(ids).logits
        # the fallback discovers run-time names on its first call: time it apart
        first = {"fxcapture attn_weights": time_call(lambda: ex_attn(ids), device)}
        out, attn = first["fxcapture attn_weights"][1]
        ref = model(ids, output_attentions=True)
        attn_ok = torch.equal(out.logits, plain) and all(
            torch.allclose(a, b, atol=1e-6) for a, b in zip(attn.values(), ref.attentions)
        ) and len(attn) == len(ref.attentions)
        first["fxcapture blocks"] = time_call(lambda: ex_blocks(ids), device)
        out_b, blocks = first["fxcapture blocks"][1]
        _, hook_blocks = hooks(ids)
        blocks_ok = torch.equal(out_b.logits, plain) and same_values(blocks.values(), hook_blocks.values())
        first_s = {method: seconds for method, (seconds, _) in first.items()}
        del first, out, attn, ref, out_b, blocks, hook_blocks  # not kept alive while timing
        contenders = {
            "plain": lambda: model(ids),
            "fxcapture attn_weights": lambda: ex_attn(ids),
            "output_attentions=True": lambda: model(ids, output_attentions=True),
            "fxcapture blocks": lambda: ex_blocks(ids),
            "hooks blocks": lambda: hooks(ids),
        }
        progress(f"gpt2 on {device}: timing {args.rounds} rounds")
        t = time_interleaved(contenders, args.rounds, iters=args.iters, device=device)
    hooks.remove()
    name = f"gpt2 ({model.config.n_layer} layers, seq {seq})"
    n = model.config.n_layer
    rows = [
        ("-", "plain", None, None, True),
        (f"{n} attn_weights", "fxcapture attn_weights", builds["attn_weights"][0], "output_attentions=True", attn_ok),
        (f"{n} attn_weights", "output_attentions=True", None, "output_attentions=True", True),
        (f"{n} blocks", "fxcapture blocks", builds["blocks"][0], "hooks blocks", blocks_ok),
        (f"{n} blocks", "hooks blocks", None, "hooks blocks", True),
    ]
    for captured, method, build, reference, ok in rows:
        table.add(
            name, captured, method, fmt_s(build), fmt_s(first_s.get(method)),
            fmt_ms(t[method].median), fmt_ms(t[method].best),
            fmt_ratio(ratio(t, method, "plain")), fmt_ratio(ratio(t, method, reference) if reference else None),
            "yes" if ok else "NO",
        )  # fmt: skip
    worst = max(ratio(t, "fxcapture attn_weights", "plain"), ratio(t, "fxcapture blocks", "plain"))
    table.notes.append(
        f"fallback x plain at most {worst:.3f} (target <= {FALLBACK_TARGET}: "
        f"{'met' if worst <= FALLBACK_TARGET else 'not met'}); reference for attn_weights: the model's "
        "own output_attentions=True (keeps the same tensors), for blocks: forward hooks"
    )


# -- main ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, batch_size=8, rounds=15)
    parser.add_argument("--models", default="resnet50,vit,gpt2",
                        help="comma-separated subset of resnet50, vit, gpt2 (default: all)")  # fmt: skip
    args = finish_arguments(parser.parse_args(argv))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(WORKLOADS) - {"gpt2"}
    if unknown:
        parser.error(f"unknown --models {sorted(unknown)}; choose from resnet50, vit, gpt2")
    return args


def main(argv: Sequence[str] | None = None) -> list[Table]:
    """Run the benchmark; print (and with ``--save`` write) the tables; return them."""
    args = parse_args(argv)
    sections: list[str | Table] = []
    tables: list[Table] = []
    for device in devices(args.device):
        table = Table(f"Overhead of capture, eager ({device.type})", HEADERS)
        table.notes.append(
            "x plain / x hooks: median over interleaved rounds of (method / plain) and (method / "
            "hooks keeping the same tensors); best ms: fastest round (noise only adds time)"
        )
        for name in args.models:
            if name in WORKLOADS:
                measure_workload(WORKLOADS[name](args.batch_size, args.quick), device, args, table)
        tables.append(table)
        if "gpt2" in args.models:
            tables.append(measure_fallback(device, args))
        sections.append(header_line(args, device))  # after the run: names the libraries it loaded
        sections += tables[-2:] if "gpt2" in args.models else tables[-1:]
    report("overhead", sections, args.save)
    return tables


if __name__ == "__main__":
    main()
