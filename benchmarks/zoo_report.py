"""Run the zoo conformance checks and write a markdown report.

A sample of timm models across every family (``tests/zoo/timm_models.py``: output,
``feature_info`` modules vs forward hooks, 3 SGD steps vs an eager copy), transformers
from small configs with eager and sdpa attention (``tests/zoo/hf_models.py``: 10 calls
at varying batch and sequence length, ``attn_weights`` vs ``output_attentions``, the
running tracer) and every torchvision classifier (``tests/zoo/zoo_checker.py``). Each
model is listed with the tracer that captured it, pass or fail, and the failure class;
nothing is skipped silently (a timm model that timm itself cannot run is "skipped",
with timm's error).

Usage::

    python benchmarks/zoo_report.py                      # everything -> benchmarks/results/zoo_report.md
    python benchmarks/zoo_report.py --zoo torchvision    # one zoo (results of the others are kept)
    python benchmarks/zoo_report.py --only resnet18,swin_t
    python benchmarks/zoo_report.py --zoo timm --part 1/2 --cache /tmp/a.json   # 2 processes
    python benchmarks/zoo_report.py --render-only --cache /tmp/a.json --cache /tmp/b.json

Results are cached per model in ``--cache`` (JSON) so that an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import signal
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "zoo")]

import torch  # noqa: E402

import hf_models  # noqa: E402
import timm_models as tm  # noqa: E402
import torchvision_models as tv  # noqa: E402
import zoo_checker as zc  # noqa: E402

ZOOS = ("timm", "transformers", "torchvision")

# (pattern in the reason, failure class), first match wins
FAILURE_CLASSES = [
    ("timm cannot run", "timm itself cannot run it (skipped)"),
    ("build:", "build error"),
    ("not 'running'", "not captured by the running tracer"),
    ("became", "tracer changed between calls"),
    ("keys missing", "selected key missing"),
    ("captured, the model returned", "attention map count"),
    ("attn_weights", "attention map differs"),
    ("grad ", "gradient differs"),
    ("buffer ", "buffer differs"),
    ("train step", "train output/feature differs"),
    ("train output", "train output differs"),
    ("train module", "train module differs"),
    ("eval output", "eval output differs"),
    ("] output", "output differs"),
    ("output", "output differs"),
    ("feature", "feature module differs from hooks"),
    ("module", "module differs from hooks"),
    ("local", "local differs from the eager frame"),
]


def failure_class(row: dict) -> str:
    """A short class for a failed row: its crash stage and exception, or what differs."""
    if row["status"] == "pass":
        return "-"
    reason = row["reason"]
    if "TimeoutError" in reason:
        return "timeout (the report's per-model limit)"
    if "mismatches, first:" not in reason and ": " in reason and "timm cannot run" not in reason:
        stage, _, rest = reason.partition(": ")
        return f"{stage.split(' (')[0]} crash ({rest.split(':')[0]})"
    return next((cls for pattern, cls in FAILURE_CLASSES if pattern in reason), "other")


def models_of(zoo: str) -> list[str]:
    if zoo == "torchvision":
        return tv.torchvision_models()
    if zoo == "timm":
        return tm.sample_names()
    return list(hf_models.CONFIGS)


def _check(zoo: str, name: str) -> zc.Result:
    if zoo == "transformers":
        return hf_models.check_hf(name)
    if zoo == "timm":
        try:
            model, x = tm.build_timm(name)
        except Exception as err:  # noqa: BLE001 - timm's own failure: listed as skipped
            return zc.Result(name=name, status="skipped", reason=zc._first_line(err))
        return tm.check_timm(model, x, name)
    return zc.check_model(*tv.build_torchvision(name), name=name)


def _timeout(signum, frame):
    run_one.timed_out = True  # the engine may catch the error and fall back: flagged below
    raise TimeoutError(f"over the report's limit of {run_one.limit} s per model")


def run_one(zoo: str, name: str) -> dict:
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(run_one.limit)
    run_one.timed_out = False
    try:
        result = _check(zoo, name)
    except Exception as err:  # noqa: BLE001 - a model that does not even build is listed
        result = zc.Result(name=name, reason=f"build: {zc._first_line(err)}")
    finally:
        signal.alarm(0)
    if run_one.timed_out and result.status != "fail":
        result.status, result.reason = "fail", f"TimeoutError: over {run_one.limit} s (caught: {result.reason})"
    gc.collect()
    row = dataclasses.asdict(result)
    row["zoo"] = zoo
    row["total_seconds"] = time.perf_counter() - start
    row["failure_class"] = failure_class(row) if row["status"] == "fail" else "-"
    return row


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


CHECKS = {
    "timm": "eval output `torch.equal` to `model(x)`; the modules of `model.feature_info` equal "
            "to forward hooks; 3 SGD steps (batch 2, new data each step) of the extractor beside an eager deep "
            "copy with the same data and seeds: outputs, features, every gradient and buffer equal "
            "at each step. Tracer: eval / train.",
    "transformers": "small configs (2 layers, hidden 32), eager and sdpa attention; 10 calls at "
                    "batch x sequence 2x8, 3x5, 1x12, 2x16, 4x3, 1x1, 3x9, 2x8, 1x6, 4x14: output "
                    "`torch.equal`, every selected key present, 20 sampled modules equal to hooks, "
                    "eager `attn_weights` equal to `output_attentions=True`, `ex.tracer == "
                    "'running'`.",
    "torchvision": "eval output `torch.equal`; every child and 20 sampled deeper modules equal to "
                   "hooks; the locals of one block equal to the eager frame's values; one train-mode "
                   "call equal to a deep copy (output, children, buffers). Tracer: eval / train.",
}


def _summary(rows: list[dict]) -> list[str]:
    classes: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] == "fail":
            classes.setdefault(r["failure_class"], []).append(r["name"])
    lines = [f"- {cls}: {len(names)} ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
             for cls, names in sorted(classes.items(), key=lambda kv: -len(kv[1]))]  # fmt: skip
    return lines or ["- none"]


def _counts(rows: list[dict]) -> str:
    tracers: dict[str, int] = {}
    for r in rows:
        if r["tracer"]:
            tracers[r["tracer"]] = tracers.get(r["tracer"], 0) + 1
    status = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skipped")}
    used = ", ".join(f"{n} {t}" for t, n in sorted(tracers.items(), key=lambda kv: -kv[1]))
    return (f"{len(rows)} models: {status['pass']} pass, {status['fail']} fail, "
            f"{status['skipped']} skipped (timm itself cannot run them) (tracers: {used or '-'})")  # fmt: skip


def render(rows: list[dict], not_run: list[str] = ()) -> str:
    lines = [
        "# Zoo conformance report",
        "",
        "Generated by `python benchmarks/zoo_report.py` (random weights, CPU, one thread, "
        f"torch {torch.__version__}). Every check compares with the eager model itself "
        "(forward hooks, `output_attentions`, an eager deep copy trained beside the "
        "extractor), never with fxcapture. Failures are listed with their class; nothing "
        "is hidden.",
        "",
        f"**{_counts(rows)}.**",
        "",
        "Failure classes (count, examples):",
        "",
        *_summary(rows),
        "",
    ]
    if not_run:
        lines += [f"Not run yet ({len(not_run)}; rerun the script to add them): "
                  + ", ".join(f"`{k}`" for k in not_run), ""]  # fmt: skip
    for zoo in ZOOS:
        part = [r for r in rows if r["zoo"] == zoo]
        if not part:
            continue
        lines += [
            f"## {zoo}: {_counts(part)}",
            "",
            CHECKS[zoo],
            "",
            "| model | input | tracer | status | failure class | modules / locals checked | first problem | capture + first call s | total s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in part:
            shape = "x".join(map(str, r["input_shape"][1:])) or "-"
            locals_ = f"{r['n_locals']} ({r['locals_module']})" if r["locals_module"] else "0"
            tol = "" if r.get("tolerance", "exact") == "exact" else f" ({r['tolerance']})"
            lines.append(
                f"| {r['name']} | {shape} | {r['tracer'] or '-'} | {r['status']}{tol} | "
                f"{r.get('failure_class', '-')} | {r['n_modules']} / {locals_} | "
                f"{_cell(r['reason'][:240]) or '-'} | {r.get('seconds_eval', 0):.1f} | {r['total_seconds']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", action="append", choices=ZOOS, help="default: all")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--part", default="1/1", help="k/n: run every n-th model from the k-th")
    parser.add_argument("--cache", action="append",
                        help="JSON results; the first is written, all are read (default "
                             "/tmp/fxcapture_zoo_results.json)")  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    parser.add_argument("--reverse", action="store_true",
                        help="walk the models backwards, re-reading the other caches before each "
                             "one (a helper process for a run already under way)")  # fmt: skip
    parser.add_argument("--render-only", action="store_true", help="write the report from the caches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=300, help="seconds per model (then: fail)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo_report.md"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)  # tiny inputs: threads mostly contend
    run_one.limit = args.limit

    paths = [Path(p) for p in args.cache or ["/tmp/fxcapture_zoo_results.json"]]
    cache: dict[str, dict] = {}
    for path in paths:
        if path.exists() and not (args.fresh and path == paths[0]):
            cache.update(json.loads(path.read_text()))
    written = {k: v for k, v in json.loads(paths[0].read_text()).items()} if paths[0].exists() and not args.fresh else {}
    only = {n for n in args.only.split(",") if n}
    k, n = (int(v) for v in args.part.split("/"))
    for zoo in [] if args.render_only else args.zoo or ZOOS:
        names = list(enumerate(models_of(zoo)))
        for i, name in reversed(names) if args.reverse else names:
            key = f"{zoo}:{name}"
            if args.reverse:
                for path in paths[1:]:
                    cache.update(json.loads(path.read_text()) if path.exists() else {})
            if (only and name not in only) or i % n != k - 1 or (key in cache and not only):
                continue
            row = run_one(zoo, name)
            cache[key] = written[key] = row
            paths[0].write_text(json.dumps(written, indent=1))
            print(f"{key:45s} {row['status']:8s} {row['tracer']:22s} {row['total_seconds']:6.1f}s "
                  f"{row['reason'][:100]}", flush=True)  # fmt: skip
    keys = [f"{zoo}:{m}" for zoo in args.zoo or ZOOS for m in models_of(zoo)]
    rows = [cache[k] for k in keys if k in cache]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, [k for k in keys if k not in cache]))
    print(f"wrote {out} ({len(rows)} models)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
