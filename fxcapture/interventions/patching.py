"""Activation patching: run a clean and a corrupted input, put clean values into the
corrupted run, one name at a time (or all at once), and return the outputs.

This is the causal-tracing / activation-patching experiment of mechanistic
interpretability (TransformerLens ``patching``, nnsight's ``.output = clean``, baukit
``edit_output``), by the names of :func:`fxcapture.capture`:

1. the clean input runs once, capturing every selected value;
2. the corrupted input runs once, unpatched (the baseline);
3. the corrupted input runs with each selected value replaced by its clean value.

Step 3 is batched when it can be: the corrupted input is stacked ``n`` times along
the batch dimension and value ``i`` is patched into slice ``i`` only, so ``n``
patches cost one forward of batch ``n * B``. That is only right for models whose
samples do not interact (no batch norm in training mode, no batch-wide mean), so by
default (``batched="auto"``) an extra unpatched slice rides along and its output is
compared with the baseline; if they differ, or a value's dimension 0 is not the
batch, the patches run one forward each instead.

Swap the arguments to patch corrupted values into the clean run ("noising" instead
of "denoising").

Example::

    >>> from fxcapture import patch
    >>> result = patch(model, "blocks.*", clean_images, corrupted_images)
    >>> result.patched["blocks.2"]            # output of the corrupted run, blocks.2 patched
    >>> logit = lambda out: out[:, label].mean()
    >>> result.scores(logit, normalize=True)   # 0: corrupted, 1: clean behaviour restored
    {'blocks.0': 1.0, 'blocks.1': 1.0, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .._util.tree import all_leaves, first_leaf, leaves, tree_map
from ..core.api import capture
from ..core.select import Names
from ..core.spec import as_call

Combine = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
ALL = "all"  # the key of the single output when one_at_a_time=False


class _NotStackable(Exception):
    """The stacked run cannot be split back into one output per patch."""


@dataclass
class PatchingResult:
    """What :func:`patch` returns.

    Attributes:
        clean: the model output on the clean input.
        corrupted: the model output on the corrupted input, unpatched.
        patched: ``{key: output}``: the corrupted run with ``key`` patched from the
            clean run (one entry ``"all"`` when every key was patched at once).
        batched: whether the patched runs were stacked into one batch.
    """

    clean: Any
    corrupted: Any
    patched: dict[str, Any]
    batched: bool

    def scores(
        self, metric: Callable[[Any], Any], *, normalize: bool = False
    ) -> dict[str, float]:
        """``{key: metric(patched output)}``.

        With ``normalize=True``: ``(m(patched) - m(corrupted)) / (m(clean) - m(corrupted))``,
        the fraction of the clean behaviour the patch restores (0 = none, 1 = all).

        Example::

            >>> result.scores(lambda out: out[:, 3].mean(), normalize=True)
        """
        values = {key: float(metric(out)) for key, out in self.patched.items()}
        if not normalize:
            return values
        low, high = float(metric(self.corrupted)), float(metric(self.clean))
        if high == low:
            raise ValueError(
                "the metric is the same on the clean and the corrupted output "
                f"({high}): there is no difference to normalise by."
            )
        return {key: (v - low) / (high - low) for key, v in values.items()}


# -- inputs and outputs ----------------------------------------------------------------
def _batch_size(args: tuple, kwargs: dict) -> int | None:
    first = first_leaf((args, kwargs))
    return first.shape[0] if first is not None and first.dim() else None


def _repeat(value: Any, n: int, batch: int) -> Any:
    """``value`` with every tensor whose dimension 0 is the batch repeated ``n`` times."""

    def repeat(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[0] == batch:
            return t.repeat(n, *([1] * (t.dim() - 1)))
        return t

    return tree_map(repeat, value)


_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def _slice_output(value: Any, part: slice, total: int) -> Any:
    """The rows ``part`` of every tensor of a stacked output (batch ``total``)."""
    for leaf in all_leaves(value):
        if not isinstance(leaf, _PLAIN):  # e.g. a cache object: cannot be split
            raise _NotStackable(f"an output of type {type(leaf).__name__}")

    def rows(t: torch.Tensor) -> torch.Tensor:
        if not t.dim() or t.shape[0] != total:
            raise _NotStackable(f"an output tensor of shape {tuple(t.shape)}")
        return t[part]

    return tree_map(rows, value)


def _close(a: Any, b: Any) -> bool:
    ta, tb = leaves(a), leaves(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        # Other batch sizes may pick other kernels: allow rounding, not a different result.
        scale = float(y.abs().max()) if y.numel() else 0.0
        if not torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-5 * max(1.0, scale)):
            return False
    return True


# -- the edit that patches -----------------------------------------------------------
def take_clean(clean: torch.Tensor, corrupted: torch.Tensor, key: str) -> torch.Tensor:
    """The default ``combine``: the whole clean value."""
    try:
        return torch.broadcast_to(clean, corrupted.shape)
    except RuntimeError as e:
        raise ValueError(
            f"the clean value of {key!r} has shape {tuple(clean.shape)} and the corrupted "
            f"one {tuple(corrupted.shape)}: patching needs inputs of the same shape "
            "(pad the prompts or images to the same size)."
        ) from e


class _Patcher:
    """The edit behind every patched key: identity unless a slot is active for it."""

    def __init__(self, combine: Combine) -> None:
        self.combine = combine
        self.clean: dict[str, Any] = {}
        self.slots: dict[str, slice] = {}  # key -> rows of the (stacked) batch to patch
        self.total = 0  # batch size of the stacked run (0: not stacked)

    def __call__(self, value: Any, key: str) -> Any:
        part = self.slots.get(key)
        if part is None:
            return value
        return self._patch(self.clean[key], value, part, key)

    def _patch(self, clean: Any, value: Any, part: slice, key: str) -> Any:
        # the clean and the corrupted value have the same structure: pair their tensors
        clean_tensors = iter(leaves(clean))
        return tree_map(lambda v: self._patch_tensor(next(clean_tensors), v, part, key), value)

    def _patch_tensor(self, clean: torch.Tensor, value: torch.Tensor, part: slice, key: str):
        if not self.total:
            return self._combine(clean, value, key)
        if not value.dim() or value.shape[0] != self.total:
            raise _NotStackable(f"{key!r} has shape {tuple(value.shape)}, not batch-first")
        patched = self._combine(clean, value[part], key)
        return torch.cat([value[: part.start], patched, value[part.stop :]])

    def _combine(self, clean: torch.Tensor, value: torch.Tensor, key: str) -> torch.Tensor:
        new = self.combine(clean, value, key)
        if new.shape != value.shape:
            raise ValueError(
                f"combine returned shape {tuple(new.shape)} for {key!r}, expected "
                f"{tuple(value.shape)}"
            )
        return new


# -- the runs ----------------------------------------------------------------------------
def _run_loop(ex, patcher: _Patcher, groups: dict[str, list[str]], args, kwargs) -> dict:
    outputs = {}
    patcher.total = 0
    for label, keys in groups.items():
        patcher.slots = {k: slice(None) for k in keys}
        outputs[label] = ex(*args, **kwargs)[0]
    patcher.slots = {}
    return outputs


def _run_stacked(
    ex, patcher: _Patcher, groups: dict[str, list[str]], args, kwargs, batch: int,
    chunk: int | None, baseline: Any | None,
) -> dict | None:  # fmt: skip
    """Patched outputs from stacked runs; ``None`` if the check slice disagrees."""
    labels = list(groups)
    chunk = chunk or len(labels)
    outputs = {}
    for start in range(0, len(labels), chunk):
        part = labels[start : start + chunk]
        check = baseline is not None and start == 0
        n = len(part) + check
        patcher.total = n * batch
        rows = [slice(i * batch, (i + 1) * batch) for i in range(n)]
        patcher.slots = {k: rows[i] for i, label in enumerate(part) for k in groups[label]}
        try:
            out = ex(*_repeat(args, n, batch), **_repeat(kwargs, n, batch))[0]
            slices = [_slice_output(out, r, n * batch) for r in rows]
        finally:
            patcher.slots, patcher.total = {}, 0
        if check and not _close(slices[-1], baseline):
            return None
        outputs.update(zip(part, slices))
    return outputs


def patch(
    model: torch.nn.Module,
    names: Names,
    clean: Any,
    corrupted: Any,
    *,
    one_at_a_time: bool = True,
    combine: Combine = take_clean,
    batched: bool | str = "auto",
    chunk: int | None = None,
    **capture_kwargs: Any,
) -> PatchingResult:
    """Patch the values ``names`` selects from the clean run into the corrupted run.

    Args:
        model: the model (never modified). Runs under ``torch.no_grad()``.
        names: selectors as for :func:`fxcapture.capture` (module paths, locals,
            ``%nodes``, globs, predicates); results are keyed by canonical key.
        clean, corrupted: the inputs: a tensor (one positional argument), a tuple
            (the positional arguments) or a dict (keyword arguments, e.g.
            ``{"input_ids": ids}``). They must give values of the same shapes.
        one_at_a_time: patch each key in its own run (``patched[key]``); if False,
            patch all of them in one run (``patched["all"]``).
        combine: ``combine(clean, corrupted, key) -> patched`` builds each patched
            tensor (default: the clean one). Patch one head or one position with
            e.g. ``lambda c, r, k: torch.where(head_mask, c, r)``.
        batched: ``"auto"`` stacks the patched runs into one batch when the model
            checks out as batch-independent, ``True`` stacks without the check,
            ``False`` runs them one by one.
        chunk: at most this many patches per stacked run (bounds memory).
        capture_kwargs: passed on to :func:`fxcapture.capture` (``leaf_modules``, ...).

    Returns:
        a :class:`PatchingResult`: ``clean``, ``corrupted`` and ``patched`` outputs.

    Example::

        >>> r = patch(resnet, ["layer2", "layer3"], img_a, img_b)
        >>> r.patched["layer3"]   # resnet(img_b) with layer3's output taken from img_a
    """
    if isinstance(names, Mapping):
        raise TypeError(
            "patch() takes selectors (a string, a list, a predicate), not {alias: selector}: "
            "its results are keyed by canonical keys."
        )
    if batched not in (True, False, "auto"):
        raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
    clean_args, clean_kwargs = as_call(clean)
    args, kwargs = as_call(corrupted)
    with torch.no_grad():
        recorder = capture(model, names, **capture_kwargs)
        clean_out, clean_values = recorder(*clean_args, **clean_kwargs)
        keys = list(clean_values)
        patcher = _Patcher(combine)
        patcher.clean = clean_values
        ex = capture(model, [], edit={key: patcher for key in keys}, **capture_kwargs)
        corrupted_out = ex(*args, **kwargs)[0]
        groups = {key: [key] for key in keys} if one_at_a_time else {ALL: keys}
        outputs = None
        batch = _batch_size(args, kwargs)
        if batched and batch and len(groups) > 1:
            baseline = corrupted_out if batched == "auto" else None
            try:
                outputs = _run_stacked(ex, patcher, groups, args, kwargs, batch, chunk, baseline)
            except _NotStackable as e:
                if batched is True:
                    raise ValueError(
                        f"cannot stack the patched runs into one batch: {e} does not have "
                        "the batch in dimension 0; use batched=False."
                    ) from None
        stacked = outputs is not None
        if outputs is None:
            outputs = _run_loop(ex, patcher, groups, args, kwargs)
    return PatchingResult(clean_out, corrupted_out, outputs, stacked)


__all__ = ["ALL", "PatchingResult", "patch", "take_clean"]
