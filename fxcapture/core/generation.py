"""Generation: the model's own ``generate`` with an extractor as the forward of every step.

:func:`generate` runs ``model.generate`` (its logits processors, stopping criteria,
caches, sampling and beams) on a *view* of the model: a second object of the model's
class sharing its ``__dict__``'s values (submodules, parameters, buffers, config), whose
``forward`` is the extractor. The model itself is never modified, and the extractor
traces the real model, so nothing calls back into ``generate``'s forward.

Each call of the forward is one step: step 0 reads the prompt (the prefill), step
``t >= 1`` the ``t``-th generated token with the cache of the steps before. Decoding
steps share one graph: the cache is a graph input whose length is dynamic (see
:mod:`.running`), so a 20-token completion traces the prompt step and one decoding
step, and edits of the extractor apply in every step.

Layout of the features (:class:`GeneratedFeatures`):

* ``feats[key]`` is a list with one value per step (``None`` where a step did not
  produce the key). Rows are the rows ``generate`` ran: ``batch * num_return_sequences``
  for sampling and greedy search (row ``i`` is ``sequences[i]``), ``batch * num_beams``
  beam slots for beam search (reordered by ``generate`` between steps).
* ``feats.aligned(key)`` concatenates a value with a sequence dimension (dim 1, such as
  the output of a transformer block) over the steps: one ``(rows, prompt + new - 1,
  ...)`` tensor whose position ``p`` is the value at token ``p`` of ``sequences``
  (the last generated token is never fed back, so it has no value). Values whose
  dim 1 does not grow with the tokens (attention probabilities of step ``t`` have
  ``prompt + t`` keys) stay per step. Beam slots are not hypotheses: ``aligned``
  refuses beam search.

Example::

    >>> ex = capture(gpt2, ["transformer.h.5"])
    >>> sequences, feats = ex.generate(ids, max_new_tokens=20, do_sample=False)
    >>> len(feats["transformer.h.5"])  # the prompt step and 19 decoding steps
    20
    >>> feats.aligned("transformer.h.5").shape  # (batch, prompt + 20 - 1, hidden)
    torch.Size([2, 27, 768])
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Callable

import torch

from .runtime import TRACE_UNDER_COMPILE
from .select import UnknownSelectorError

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")  # fmt: skip


class GeneratedFeatures(dict):
    """``{key: [value of step 0 (the prompt), value of step 1, ...]}`` of one ``generate``
    call (the layout is in the module docstring), with :meth:`aligned`."""

    def __init__(self, steps: list[dict[str, Any]], prompt_length: int, num_beams: int) -> None:
        keys = list(dict.fromkeys(k for step in steps for k in step))
        super().__init__((k, [step.get(k) for step in steps]) for k in keys)
        self.prompt_length = prompt_length
        self.num_beams = num_beams

    @property
    def num_steps(self) -> int:
        return len(next(iter(self.values()), []))

    def aligned(self, key: str) -> torch.Tensor:
        """``feats[key]`` of every step concatenated along dim 1: position ``p`` holds the
        value at token ``p`` of ``sequences`` (``prompt + new - 1`` positions).

        Example::

            >>> feats.aligned("transformer.h.0").shape
            torch.Size([2, 26, 768])
        """
        values = self[key]
        if self.num_beams > 1:
            raise ValueError(
                f"fxcapture: {key!r} cannot be aligned to tokens under beam search: the rows of each "
                "step are beam slots, which generate reorders between steps. Use feats[key] (one value "
                "per step) with generate's beam_indices (return_dict_in_generate=True), or num_beams=1."
            )
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]
        first, rest = values[0], values[1:]
        ok = isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[1] == self.prompt_length
        for v in rest:
            ok = ok and isinstance(v, torch.Tensor) and v.dim() == first.dim() and v.shape[1] == 1
            ok = ok and v.shape[:1] + v.shape[2:] == first.shape[:1] + first.shape[2:]
        if not ok:
            raise ValueError(
                f"fxcapture: {key!r} has no sequence dimension to align (dim 1 of {self.prompt_length} "
                f"positions in the prompt step, 1 in each decoding step); its shapes per step are "
                f"{shapes}. Read feats[key], one value per step."
            )
        return torch.cat(values, dim=1)


def _view(model: torch.nn.Module, forward: Callable) -> torch.nn.Module:
    """An object of ``model``'s class sharing its attributes' values, with ``forward``
    and no root hooks of its own (a running trace already holds the model's)."""
    view = object.__new__(type(model))
    view.__dict__.update(model.__dict__)
    for name in _HOOK_DICTS:
        view.__dict__[name] = OrderedDict()
    view.__dict__["forward"] = forward
    return view


def _prompt_length(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        ids = kwargs.get("decoder_input_ids")
        return ids.shape[1] if isinstance(ids, torch.Tensor) else 1  # the decoder start token
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs", kwargs.get("inputs_embeds")))
    return ids.shape[1] if isinstance(ids, torch.Tensor) else 0


def _encoder_selector_error(model: torch.nn.Module, err: UnknownSelectorError) -> UnknownSelectorError | None:
    """What to say of a selector inside an encoder-decoder's encoder: ``generate`` runs the
    encoder once, through ``get_encoder()``, never through the forward of a step."""
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not callable(get_encoder):
        return None
    encoder = get_encoder()
    path = next((p for p, m in model.named_modules() if m is encoder and p), None)
    selector = err.selector
    if path is None or not isinstance(selector, str) or not selector.startswith((f"{path}.", f"{path}:")):
        return None
    inner = selector[len(path):].lstrip(".")
    return UnknownSelectorError(selector, (
        f"fxcapture: {selector!r} is inside the encoder ({path!r}) of {type(model).__name__}, which "
        f"generate runs once, before the steps, through model.get_encoder(), not through the forward "
        f"of a step. Capture it from the encoder on the prompt: capture(model.get_encoder(), "
        f"[{inner!r}])(input_ids=ids, attention_mask=mask), and keep only decoder selectors for generate."
    ))


def generate(model: torch.nn.Module, step: Callable[..., tuple[Any, dict]], *args: Any,
             **generate_kwargs: Any) -> tuple[Any, GeneratedFeatures]:  # fmt: skip
    """``model.generate(*args, **generate_kwargs)`` with ``step`` (an extractor of
    ``model``) as the forward of every step; returns ``(what generate returns, feats)``.

    Example::

        >>> sequences, feats = generate(gpt2, capture(gpt2, ["transformer.h.0"]), ids, max_new_tokens=5)
    """
    if not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"fxcapture: generate() needs a model with a generate method (a transformers model "
            f"with a language-modeling head, such as GPT2LMHeadModel); {type(model).__name__} has "
            "none. Call the extractor step by step instead: ex(next_ids, cache=out.cache)."
        )
    steps: list[dict[str, Any]] = []

    @functools.wraps(model.forward)  # generate reads the forward's signature
    def forward(*args: Any, **kwargs: Any) -> Any:
        out, feats = step(*args, **kwargs)
        steps.append(feats)
        return out

    def get_compiled_call(compile_config: Any) -> Callable[..., Any]:
        """transformers' compiled decoding steps (``compile_config``, a static cache): the
        extractor compiled once for every generate, its graph traced before compiling."""
        options = (compile_config or view._default_compile_config()).to_dict()
        compiled = step.compiled_call(**options)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                out, feats = compiled(*args, **kwargs)
            except Exception as err:  # raised while compiling, before the step ran
                if TRACE_UNDER_COMPILE not in str(err):
                    raise
                step.prepare(*args, **kwargs)  # the trace these inputs need, made outside torch.compile
                out, feats = compiled(*args, **kwargs)
            steps.append(feats)
            return out

        return call

    view = _view(model, forward)
    if hasattr(step, "compiled_call"):
        view.__dict__["get_compiled_call"] = get_compiled_call
    try:
        result = view.generate(*args, **generate_kwargs)
    except UnknownSelectorError as err:
        raise (_encoder_selector_error(model, err) or err) from None
    config = getattr(model, "generation_config", None)
    beams = generate_kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    return result, GeneratedFeatures(steps, _prompt_length(model, args, generate_kwargs), beams)


__all__ = ["GeneratedFeatures", "generate"]
