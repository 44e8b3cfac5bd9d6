"""Extraction over generated text: each batch of prompts is completed by the model's own
``generate`` and stored as per-token rows of prompt and completion.

``extract(..., generate={"max_new_tokens": N, ...})`` runs every batch through
:meth:`fxcapture.core.extractor.Extractor.generate` (the extractor is the forward of every
decoding step) instead of one forward. A row of the output is a sample (a prompt and its
completion); with ``reduce="tokens"`` its tokens are stored one after the other:

* the prompt's real tokens, then the generated ones, in sequence order; padding (of the
  prompt, and after a completion that ended early) is never stored;
* a completion holds up to ``N`` generated tokens and stops before its first
  end-of-sequence token (generate may stop without reading it, so it has no value);
* beside every per-token key: ``input_ids`` (the token ids: ``generate``'s sequences),
  ``positions`` (0, 1, ... over the stored tokens) and ``generated`` (``True`` for a
  generated token, ``False`` for a prompt token).

To have a value at the ``N``-th generated token too, ``generate`` runs one more step
(``max_new_tokens=N + 1``) whose token is dropped: the stored ids are those of
``model.generate(..., max_new_tokens=N)`` for greedy search (and for sampling with the
same random numbers). Prompts are left-padded before ``generate`` (what decoder-only
models need), whatever the dataset's padding side. One completion per prompt:
``num_beams`` and ``num_return_sequences`` above 1 are refused (beam slots are not
hypotheses, and extra sequences would not be rows of the dataset).

Example::

    >>> data = TextDataset(prompts, tokenizer)
    >>> feats = extract(gpt2, ["transformer.h.5"], data, out="gen/", reduce="tokens",
    ...                 generate={"max_new_tokens": 20})
    >>> feats["generated"][feats["generated"].offsets[0]:feats["generated"].offsets[1]].ravel()
    array([False, False, False, True, True, ...])
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

# generate options that would give more or fewer completions than prompts
ONE_PER_PROMPT = ("num_beams", "num_return_sequences", "num_beam_groups")


def check_generate(model: torch.nn.Module, generate: Any, output: bool) -> dict[str, Any] | None:
    """``generate`` checked before any work: ``None``, or the options of ``model.generate``
    with a positive ``max_new_tokens`` and one completion per prompt."""
    if generate is None:
        return None
    if not isinstance(generate, Mapping):
        raise TypeError(f"generate must be a dict of model.generate options, e.g. generate={{'max_new_tokens': 20}}; "
                        f"got {type(generate).__name__}")  # fmt: skip
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"generate=... needs a model with a generate method (a transformers language model "
                        f"such as GPT2LMHeadModel); {type(model).__name__} has none: leave generate out")  # fmt: skip
    options = dict(generate)
    n = options.get("max_new_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"generate needs max_new_tokens, a positive number of tokens to generate per prompt; got {n!r}")
    if "max_length" in options:
        raise ValueError("generate: give the completion's length as max_new_tokens, not max_length")
    many = {k: options[k] for k in ONE_PER_PROMPT if (options.get(k) or 1) != 1}
    if many:
        raise ValueError(f"generate: {many} gives several completions per prompt, whose rows would not be the "
                         "dataset's: extract stores one completion per prompt (leave them out, or 1)")  # fmt: skip
    if output:
        raise ValueError("output=True stores the model's output, which generate replaces by the token ids: "
                         "leave output out (the ids are stored as input_ids beside per-token keys)")  # fmt: skip
    return options


def _left_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` and ``mask`` with every row's real tokens moved to the right end (a stable
    sort of the mask keeps their order)."""
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order), mask.gather(1, order)


def _eos_ids(extractor: Any, options: dict) -> torch.Tensor:
    config = getattr(getattr(extractor, "_model", None), "generation_config", None)
    eos = options.get("eos_token_id", getattr(config, "eos_token_id", None))
    return torch.as_tensor([] if eos is None else eos, dtype=torch.long).reshape(-1)


def generated_rows(extractor: Any, kwargs: dict, options: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Complete the prompts of a text batch (``kwargs``: ``input_ids``, ``attention_mask``);
    ``(feats, tokens)``: each key aligned to the tokens of the completed sequences, and
    ``tokens`` = ``input_ids``, ``attention_mask`` (the real tokens) and ``generated``."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise ValueError("generate=... completes text prompts: every batch must hold input_ids of shape "
                         "(batch, tokens), such as a TextDataset's")  # fmt: skip
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device).long()
    ids, mask = _left_padded(ids, mask)
    n = options["max_new_tokens"]
    result, steps = extractor.generate(**{**kwargs, "input_ids": ids, "attention_mask": mask},
                                       **{**options, "max_new_tokens": n + 1})  # fmt: skip
    sequences = getattr(result, "sequences", result)
    width = min(sequences.shape[1] - 1, ids.shape[1] + n)  # tokens with a value, at most N new ones
    new = sequences[:, ids.shape[1] : width]
    is_eos = torch.isin(new, _eos_ids(extractor, options).to(new.device))
    real_new = is_eos.long().cumsum(1) == 0  # before the first end-of-sequence token
    tokens = {
        "input_ids": sequences[:, :width],
        "attention_mask": torch.cat([mask, real_new.long()], 1),
        "generated": torch.cat([torch.zeros_like(mask, dtype=torch.bool), real_new], 1),
    }
    feats = {key: steps.aligned(key)[:, :width] for key in steps}
    return feats, tokens


__all__ = ["check_generate", "generated_rows"]
