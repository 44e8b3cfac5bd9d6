"""Generation (issue 26): tokens/s of ``ex.generate`` against plain ``model.generate`` and
``model.generate`` with forward hooks keeping the same values (every block's output at
every step), greedy, on GPT-2 (random weights): a tiny config and the 124M config.

The contenders run interleaved (see ``common.py``); ``same values`` says that
``ex.generate`` gave the sequences of ``model.generate`` and, at every step, the values
the hooks kept. Goal: ``x plain`` <= 1.05 and faster than hooks.

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
from typing import Any

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
from fxcapture import capture  # noqa: E402

HEADERS = ["model", "captured", "method", "median ms", "tokens/s", "x plain", "x hooks", "same values"]
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=256)
TARGET = 1.05  # issue 26: ex.generate / model.generate, eager


def cases(quick: bool) -> list[tuple[str, dict, int, int]]:
    """(size name, config overrides, prompt length, new tokens)."""
    if quick:
        return [("tiny", TINY, 8, 8)]
    return [("tiny", TINY, 16, 64), ("124M", {}, 16, 32)]


def gpt2(sizes: dict) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(**sizes, pad_token_id=0)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()


class HookedGenerate:
    """``model.generate`` on a copy of the model whose forward hooks keep every step's values."""

    def __init__(self, model: torch.nn.Module, paths: list[str]) -> None:
        self.model = copy.deepcopy(model)
        self.steps: dict[str, list[Any]] = {p: [] for p in paths}
        for path in paths:
            self.model.get_submodule(path).register_forward_hook(
                lambda m, a, out, path=path: self.steps[path].append(out)
            )

    def __call__(self, ids: torch.Tensor, **kwargs: Any) -> tuple[Any, dict[str, list[Any]]]:
        self.steps = {p: [] for p in self.steps}
        return self.model.generate(ids, **kwargs), self.steps


def measure(device: torch.device, args: argparse.Namespace) -> Table:
    table = Table(f"GPT-2 generate, greedy, batch {args.batch_size} ({device.type})", HEADERS)
    for size, sizes, prompt, new in cases(args.quick):
        progress(f"gpt2 {size}: prompt {prompt}, {new} new tokens")
        model = gpt2(sizes).to(device)
        paths = [f"transformer.h.{i}" for i in range(model.config.n_layer)]
        ids = torch.randint(1, model.config.vocab_size, (args.batch_size, prompt), device=device)
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        ex, hooks = capture(model, paths), HookedGenerate(model, paths)
        runs = {
            "plain": lambda: model.generate(ids, **kwargs),
            "fxcapture": lambda: ex.generate(ids, **kwargs),
            "hooks": lambda: hooks(ids, **kwargs),
        }
        sequences, feats = ex.generate(ids, **kwargs)  # traces the prompt and decoding steps
        expected, seen = hooks(ids, **kwargs)
        ok = torch.equal(sequences, expected) and all(same_values(feats[p], seen[p]) for p in paths)
        timings = time_interleaved(runs, args.rounds, iters=args.iters, device=device)
        for name in runs:
            median = timings[name].median
            table.add(f"gpt2 {size} (prompt {prompt}, +{new})", f"{len(paths)} blocks x {new} steps", name,
                      fmt_ms(median), f"{args.batch_size * new / median:.0f}",
                      fmt_ratio(ratio(timings, name, "plain")), fmt_ratio(ratio(timings, name, "hooks")),
                      ok if name == "fxcapture" else "")  # fmt: skip
    table.notes.append(f"goal: fxcapture x plain <= {TARGET}, and below hooks (x hooks < 1)")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, batch_size=1, rounds=7)
    args = finish_arguments(parser.parse_args(argv))
    sections: list[Any] = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for device in devices(args.device):
            sections += [header_line(args, device), measure(device, args)]
    report("generate", sections, args.save)


if __name__ == "__main__":
    main()
