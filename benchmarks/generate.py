"""Generation with capture: ``ex.generate`` vs ``model.generate`` with hooks vs plain ``model.generate``.

GPT-2 (random weights) at a tiny config (2 layers, 64 wide) and the 124M config, greedy
search of ``--new-tokens`` tokens (``min_new_tokens`` too, so every contender makes the
same number of steps) after a prompt of ``--prompt`` tokens, capturing every block's
output at every step. Contenders, timed side by side in interleaved rounds (see
``common.py``):

- ``plain``: ``model.generate``;
- ``hooks``: ``model.generate`` of a copy of the model with forward hooks on the blocks
  keeping every step's outputs (the same values as fxcapture);
- ``fxcapture``: ``capture(model, blocks).generate``;
- compiled (static cache): transformers' own compiled generation
  (``cache_implementation="static"``) and ``ex.generate`` with the same options, when
  the extractor supports it (otherwise a note says why not).

Tokens/s counts generated tokens (batch x new tokens) per second (median round).
Targets (issue 26): fxcapture <= 1.05 x plain eager, <= 1.05 x transformers' compiled
generation compiled, and faster than hooks.

Usage::

    python benchmarks/generate.py                 # CPU (+ CUDA if present)
    python benchmarks/generate.py --quick         # tiny sizes: checks the script works
    python benchmarks/generate.py --save          # also write benchmarks/results/generate.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `fxcapture` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Table,
    add_common_arguments,
    devices,
    finish_arguments,
    fmt_ms,
    fmt_ratio,
    header_line,
    progress,
    ratio,
    report,
    same_values,
    time_interleaved,
)
from benchmarks.overhead import TINY, gpt2_model  # noqa: E402

HEADERS = ["model", "mode", "method", "median ms", "best ms", "tokens/s", "x plain", "x hooks", "same values"]
EAGER = ["plain", "hooks", "fxcapture"]
COMPILED = ["compiled plain", "compiled fxcapture"]
TARGET = 1.05  # issue 26: fxcapture / plain generate, eager and compiled


class StepHooks:
    """Forward hooks on a copy of ``model``'s blocks keeping each step's outputs:
    ``fn(ids)`` returns ``(sequences, {path: [value of each step]})`` like ``ex.generate``."""

    def __init__(self, model: torch.nn.Module, paths: Sequence[str]) -> None:
        self.model, self.paths = copy.deepcopy(model), list(paths)
        self.store: dict[str, list[Any]] = {}
        for path in self.paths:
            self.model.get_submodule(path).register_forward_hook(self._hook(path))

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.store[path].append(output)

        return hook

    def __call__(self, ids: torch.Tensor, **options: Any) -> tuple[torch.Tensor, dict[str, list[Any]]]:
        self.store = {path: [] for path in self.paths}
        return self.model.generate(ids, **options), self.store


def compile_config(backend: str) -> Any:
    """transformers' compiled generation on any device (by default only on accelerators)."""
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode=None if backend != "inductor" else "default")
    config._compile_all_devices = True  # transformers' own switch; CPU runs are not compiled otherwise
    return config


def cases(quick: bool) -> list[tuple[str, dict]]:
    return [("tiny", TINY)] if quick else [("tiny", TINY), ("124M", {})]


def measure(size: str, sizes: dict, device: torch.device, args: argparse.Namespace, table: Table) -> None:
    from fxcapture import capture

    model = gpt2_model(sizes, "sdpa").to(device)
    blocks = [f"transformer.h.{i}" for i in range(model.config.n_layer)]
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=model.config.eos_token_id)  # fmt: skip
    name = f"gpt2 {size} (prompt {args.prompt}, {args.new_tokens} new, batch {args.batch_size})"
    tokens = args.batch_size * args.new_tokens
    ex, hooks = capture(model, blocks), StepHooks(model, blocks)
    eager = {"plain": lambda: model.generate(ids, **options), "hooks": lambda: hooks(ids, **options),
             "fxcapture": lambda: ex.generate(ids, **options)}  # fmt: skip
    rows = [("eager", eager, EAGER)]
    static = dict(options, cache_implementation="static", compile_config=compile_config(args.backend))
    compiled = {"compiled plain": lambda: model.generate(ids, **static),
                "compiled fxcapture": lambda: ex.generate(ids, **static)}  # fmt: skip
    if args.compiled:
        try:
            progress(f"{name} on {device}: compiled generation (static cache), first call")
            for fn in compiled.values():
                fn()
            rows.append(("compiled (static cache)", compiled, COMPILED))
        except Exception as err:  # the extractor may not support it yet: say so and go on
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            progress(f"{name}: compiled generation skipped: {reason}")
            table.notes.append(f"{name}: compiled generation skipped ({type(err).__name__}: {reason})")
    for mode, contenders, methods in rows:
        progress(f"{name} on {device}: {mode}, {args.rounds} rounds")
        seqs, feats = ex.generate(ids, **(static if mode != "eager" else options))
        reference = {"eager": lambda: hooks(ids, **options)}.get(mode)
        same = {}
        if reference is not None:
            ref_seqs, ref_feats = reference()
            same["fxcapture"] = torch.equal(seqs, ref_seqs) and all(
                same_values(ref_feats[k], feats[k]) for k in blocks)
        plain = contenders[methods[0]]()
        t = time_interleaved(contenders, args.rounds, iters=args.iters, device=device)
        for method in methods:
            sequences = contenders[method]() if method != methods[0] else plain
            sequences = sequences[0] if isinstance(sequences, tuple) else sequences
            ok = same.get(method, torch.equal(sequences, plain))
            vs_hooks = fmt_ratio(ratio(t, method, "hooks")) if "hooks" in contenders else "-"
            table.add(name, mode, method, fmt_ms(t[method].median), fmt_ms(t[method].best),
                      f"{tokens / t[method].median:.0f}", fmt_ratio(ratio(t, method, methods[0])), vs_hooks,
                      "yes" if ok else "NO")  # fmt: skip
        r = ratio(t, methods[-1], methods[0])
        table.notes.append(f"{name}, {mode}: fxcapture x plain {r:.3f} (target <= {TARGET}: "
                           f"{'met' if r <= TARGET else 'not met'})")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, batch_size=1, rounds=7)
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32, 6 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32, 4 with --quick)")
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="skip compiled generation (static cache)")
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend of compiled generation (default inductor, eager with --quick)")  # fmt: skip
    args = finish_arguments(parser.parse_args(argv))
    args.backend = args.backend or ("eager" if args.quick else "inductor")
    args.prompt = args.prompt or (6 if args.quick else 32)
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    return args


def main(argv: Sequence[str] | None = None) -> list[Table]:
    """Run the benchmark; print (and with ``--save`` write) the tables; return them."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="transformers")
    sections: list[str | Table] = []
    tables: list[Table] = []
    for device in devices(args.device):
        table = Table(f"Generation with capture ({device.type})", HEADERS)
        table.notes.append("x plain / x hooks: median over interleaved rounds of (method / plain generate) and "
                           "(method / generate with hooks keeping the same values); same values: fxcapture's "
                           "sequences and per-step values vs the hooks', the others' sequences vs plain")  # fmt: skip
        for size, sizes in cases(args.quick):
            measure(size, sizes, device, args, table)
        tables.append(table)
        sections += [header_line(args, device), table]
    report("generate", sections, args.save)
    return tables


if __name__ == "__main__":
    main()
