"""Run a whole dataset through a model and store chosen intermediates on disk.

:func:`extract` builds an extractor with :func:`fxcapture.capture` (pruned after the
last captured value unless the model output is stored too), runs every batch under
``torch.inference_mode`` (optionally autocast), reduces each value on the device
(mean over tokens or positions, CLS token, flatten, or a callable), copies it to the
host without stalling the device (pinned buffers and ``non_blocking`` copies on
CUDA, synchronised by an event in the writer thread) and hands it to a background
writer that streams fixed-size chunks to disk while the next batch runs. Memory does
not grow with the dataset; a killed run resumes after its last complete chunk; under
``torchrun`` each process takes its shard (see :mod:`fxcapture.dataset.distributed`).

Example::

    >>> from fxcapture import extract, load
    >>> loader = DataLoader(ImageFolder("images/", transform), batch_size=64, num_workers=8)
    >>> extract(resnet50, ["layer3", "layer4"], loader, out="feats/", reduce="mean", device="cuda")
    >>> load("feats/")["layer4"].shape         # memory-mapped, rows in dataset order
    (50000, 2048)

Command line::

    fxcapture extract --model torchvision:resnet50 --names layer4 --reduce mean \\
        --data images/ --out feats/ --batch-size 64 --device cuda
    torchrun --nproc-per-node 8 -m fxcapture extract ...      # one shard per GPU
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .._version import __version__
from ..core.api import capture
from ..core.select import check_module_paths
from ..core.spec import as_module
from .distributed import Group
from .files import check_output_folder
from .generation import check_generate
from .identity import (
    NOT_REPRODUCIBLE,
    data_fingerprint,
    describe,
    iterable_fingerprint,
    model_fingerprint,
    not_resumable,
    sampled_items,
)
from .lock import OutputLock
from .loop import Loop, autocast_context
from .output import chunk_tokens, complete_chunks, finalize, prepare_output, remove_temporaries, uncovered
from .progress import NoProgress, progress, say
from .reduce import OUTPUT_KEY, Reducer, resolve_reducers
from .sources import make_source
from .store import Features, load

STORE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype(value: Any) -> torch.dtype | None:
    """The storage dtype: ``None`` (as computed) or a floating dtype by name."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in STORE_DTYPES:
        raise ValueError(f"dtype={value!r} cannot store features: use one of {', '.join(STORE_DTYPES)} (or None)")
    return getattr(torch, name)


def _device(device: Any, model: torch.nn.Module) -> torch.device:
    """``device`` checked: a known type, and present on this machine."""
    if device is None:
        return _model_device(model)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device: use 'cpu', 'cuda', 'cuda:1' or 'mps' ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but no CUDA GPU is available here: use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' but MPS is not available here: use device='cpu'")
    return device


def _check_names(names: Any) -> None:
    if names is None or (isinstance(names, (list, tuple, dict, set, str)) and not names):
        raise ValueError(f"names={names!r} selects nothing: give what to store, e.g. names=['layer4']")


def _check_data(data: Any) -> None:
    """A path is not data: say how to make a dataset of the files there."""
    if isinstance(data, (str, os.PathLike)):
        raise TypeError(
            f"data={str(data)!r} is a path, not data: give a Dataset, a DataLoader or a tensor, e.g. "
            f"torchvision.datasets.ImageFolder({str(data)!r}, transform) for a folder of images, or "
            "fxcapture.dataset.text.TextDataset(texts, tokenizer) for text (the command line reads "
            "folders and files itself: fxcapture extract --data PATH)"
        )


def _check_sizes(batch_size: Any, chunk_size: Any, num_workers: Any) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("chunk_size", chunk_size, 1),
                             ("num_workers", num_workers, 0)):  # fmt: skip
        if value is None and name == "chunk_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            what = "a positive number" if low else "a number >= 0"
            raise ValueError(f"{name} must be {what}, got {value!r}")


def extract(
    model: torch.nn.Module,
    names: Any,
    data: Any,
    *,
    out: str | os.PathLike,
    reduce: Reducer | Mapping[str, Reducer] = None,
    device: str | torch.device | None = None,
    autocast: bool | str | torch.dtype | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    output: bool = False,
    inputs: Callable[[Any], Any] | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    resume: bool = True,
    overwrite: bool = False,
    model_name: str | None = None,
    data_name: str | None = None,
    capture_options: Mapping[str, Any] | None = None,
    max_pending: int = 4,
    max_tokens: int | None = None,
    identity: Mapping[str, Any] | None = None,
    flush_seconds: float = 30.0,
    log_seconds: float = 30.0,
    verify_data: bool = False,
    generate: Mapping[str, Any] | None = None,
) -> Features:
    """Run ``data`` through ``model`` and store the values ``names`` selects under ``out``.

    Args:
        model: the model; it is moved to ``device``, run in eval mode (its train/eval
            flags are restored afterwards) and otherwise untouched.
        names: selectors as for :func:`fxcapture.capture` (``"layer4"``, ``"attn"``,
            ``{"feat": "blocks.11"}``).
        data: a ``DataLoader``, a map-style ``Dataset`` (batched with ``batch_size``
            and ``num_workers``), a tensor of samples, or any iterable of batches. A
            batch is a tensor (the input), a tuple/list (its first item is the input:
            labels are ignored) or a dict (keyword arguments, e.g. ``input_ids`` and
            ``attention_mask``); ``inputs(batch)`` may return the positional arguments
            (tuple) or keyword arguments (dict) instead. Rows are stored in the order
            the data yields them.
        out: output directory (see :mod:`fxcapture.dataset.storage` for the layout).
        reduce: applied on the device before the copy: ``"mean"``, ``"max"``, ``"cls"``,
            ``"last"``, ``"tokens"`` (one row per real token), ``"flatten"``, ``"none"``,
            a callable, or ``{selector: reducer}`` per key (see :mod:`.reduce`).
        device: where the model runs (default: where its parameters are).
        autocast: ``True`` or a dtype: run under ``torch.autocast``.
        dtype: store floating values as ``"float16"``, ``"bfloat16"`` (raw 16-bit on
            disk), ``"float32"`` or ``"float64"``.
        output: also store the model output, under the key ``"output"``.
        chunk_size: rows per chunk (default: whole batches filling about 16 MiB).
        progress: a tqdm bar; default: a bar on a terminal, a log line every
            ``log_seconds`` otherwise; ``False``: silent.
        resume: continue an unfinished run of the same identity in ``out``.
        overwrite: replace an existing output (only what fxcapture wrote is removed).
        model_name, data_name: how the manifest names the model and the data (the
            identity also holds a checksum of the weights and a fingerprint of the data).
        capture_options: more arguments of :func:`fxcapture.capture`.
        max_pending: batches queued for the writer before the loop waits for the disk.
        max_tokens: with a per-token reducer, stop once this many tokens are stored
            (a resumed run continues to the same budget).
        identity: anything else that changes the rows (CLI options, transforms):
            another identity in ``out`` is refused without ``overwrite``.
        flush_seconds: a partial chunk whose first row waited this long is written.
        verify_data: recognise a map-style dataset by a hash of every item, not only of
            its length and 8 items spread over it (what a finished or resumed output
            says it compared): costs one read of the whole dataset.
        generate: options of ``model.generate`` (``max_new_tokens`` required): complete
            each prompt of a text dataset and store its prompt and completion, with
            ``reduce="tokens"`` one row per token beside ``input_ids``, ``positions``
            and ``generated`` (layout: :mod:`fxcapture.dataset.generation`).

    Returns:
        ``fxcapture.load(out)``: lazily mapped columns, rows in dataset order.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process takes a contiguous shard of
    a ``Dataset`` or sequential ``DataLoader``, writes its own chunks, and rank 0
    finishes the output; every rank returns the whole result. Rank 0 holds the
    folder's lock: a second run into ``out`` is refused while this one writes.

    Example::

        >>> feats = extract(vit, {"cls": "blocks.11"}, dataset, out="feats/", reduce="cls",
        ...                 batch_size=128, device="cuda", autocast=True)
        >>> feats["cls"].shape
        (10000, 768)
        >>> feats = extract(gpt2, ["transformer.h.5"], TextDataset(prompts, tokenizer), out="gen/",
        ...                 reduce="tokens", generate={"max_new_tokens": 20})
        >>> feats["generated"][:].ravel()  # per token: False in the prompt, True in the completion
    """
    # cheap checks first: nothing is traced, loaded or hashed before the arguments hold
    model = as_module(model, "extract")
    out = check_output_folder(out)
    _check_names(names)
    _check_data(data)
    _check_sizes(batch_size, chunk_size, num_workers)
    check_module_paths(names, model)
    device = _device(device, model)
    store_dtype = _dtype(dtype)
    autocast_context(device, autocast)  # checks the argument before any work
    generate = check_generate(model, generate, output)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens!r}")
    group = Group.from_env(device)
    lock = None
    try:
        device = group.device(device)
        source = make_source(data, batch_size, num_workers, pin_memory=device.type == "cuda")
        if source.total == 0:
            raise ValueError("data holds no rows (an empty dataset): nothing to extract")
        if group.world_size > 1 and (source.total is None or max_tokens is not None):
            raise ValueError(
                "under torch.distributed, data must be a map-style Dataset or a DataLoader over one "
                "with a sequential sampler (and no max_tokens), so that every process loads only its "
                f"shard; got {type(data).__name__}"
            )
        reason = not_resumable(data)
        data_identity = _data_identity(data, source, reason, verify_data)
        if isinstance(data_identity, dict) and data_identity.get("content") == NOT_REPRODUCIBLE:
            reason = "the dataset gives other values each time an item is read (a random transform?)"
        config = {
            "model": model_name or type(model).__qualname__,
            "model_fingerprint": model_fingerprint(model),
            "names": describe(names),
            "reduce": describe(reduce),
            "output": bool(output),
            "dtype": describe(store_dtype),
            "autocast": describe(autocast or None),
            "inputs": describe(inputs),
            "capture_options": describe(capture_options),
            "data": data_name or source.describe(),
            "data_fingerprint": data_identity,
            "rows": source.total,
            "max_tokens": max_tokens,
            "identity": describe(identity),
            **({"generate": describe(generate)} if generate else {}),
        }
        # generate reads the logits: the graph keeps the model output
        extractor = capture(model, names, keep_output=bool(output or generate), **dict(capture_options or {}))
        if extractor.names and not getattr(extractor, "untraced", None):  # all keys known: check now
            resolve_reducers(reduce, [OUTPUT_KEY] * bool(output) + extractor.names, extractor.catalogue)
        # rank 0 locks and prepares the folder first; the others check it once it is ready
        if group.primary:
            lock = OutputLock(out).acquire()
            state = prepare_output(out, config, resume=resume, overwrite=overwrite, not_resumable=reason)
        group.barrier()
        if not group.primary:
            state = prepare_output(out, config, resume=resume, overwrite=overwrite, primary=False)
        if state == "finished":
            if group.primary:
                say(f"{out} is already complete ({config['rows'] or 'all'} rows); nothing to do "
                    f"(overwrite=True / --overwrite computes it again). {_recognised(data_identity)}")
            return load(out)
        run, total = _run(model, extractor, out, device, group, source, data, dict(
            reduce=reduce, output=bool(output), dtype=store_dtype, autocast=autocast, chunk_size=chunk_size,
            max_pending=max_pending, max_tokens=max_tokens, flush_seconds=flush_seconds, generate=generate),
            inputs, progress, log_seconds, _recognised(data_identity))  # fmt: skip
        group.barrier()
        if group.primary:
            if total == 0:
                raise ValueError("data holds no rows: nothing to extract")
            finalize(out, total, extra={
                "fxcapture_version": __version__, "torch_version": torch.__version__,
                "world_size": group.world_size, "tokens": run.tokens_before + run.tokens_done or None,
                "last_run": {"rows": run.rows_done, "seconds": round(run.seconds, 3), "device": str(device)},
            })  # fmt: skip
        group.barrier()
        return load(out)
    finally:
        if lock is not None:
            lock.release()
        group.close()


def _data_identity(data: Any, source: Any, reason: str | None, verify_data: bool = False) -> Any:
    """A content fingerprint of the data (see :mod:`.identity`); a marker when it has none."""
    dataset = getattr(source, "dataset", None)
    if dataset is not None:
        return data_fingerprint(dataset, every_item=verify_data)
    if reason:
        return f"not reproducible: {reason}"
    return iterable_fingerprint(data) or describe(type(data))


def _recognised(identity: Any) -> str:
    """How the data was recognised as the output's, in words (what was compared)."""
    if not isinstance(identity, dict) or "items" not in identity:
        return f"The data was recognised by {identity!r}."
    if identity.get("hashed") == "all":
        return f"The data was recognised by a hash of every one of its {identity['items']} items."
    return (
        f"The data was recognised by its length ({identity['items']}) and a hash of items "
        f"{sampled_items(identity['items'])} only: verify_data=True hashes every item."
    )


def _run(model: torch.nn.Module, extractor: torch.nn.Module, out: Path, device: torch.device, group: Group,
         source: Any, data: Any, options: dict, inputs: Any, show: Any, log_seconds: float,
         recognised: str) -> tuple[Loop, int]:  # fmt: skip
    """Compute the rows no complete chunk holds; ``(loop, total rows of the output)``. A
    resumed run says so: rows kept, rows left, and how the data was ``recognised``."""
    previous = {m: m.training for m in model.modules()}
    model.to(device)
    extractor.eval()
    seen: dict[str, int] = {}
    by_prefix = source.total is None or options["max_tokens"] is not None
    try:
        if not by_prefix:
            lo, hi = group.shard(source.total, align=source.batch_size)
            remove_temporaries(out, lo, hi)
            todo = uncovered(complete_chunks(out), lo, hi)
            batches = source.batches(todo, inputs, seen)
            todo_rows, skip, tokens = sum(b - a for a, b in todo), 0, 0
        else:
            remove_temporaries(out)
            skip, tokens = _stored_prefix(out)
            ranges = [(skip, source.total)] if source.total is not None and skip < source.total else []
            batches = source.batches(ranges if source.total is not None else skip, inputs, seen)
            todo_rows = source.total - skip if source.total is not None and options["max_tokens"] is None else None
        kept = sum(c.stop - c.start for c in complete_chunks(out)) if not by_prefix else skip
        if kept and group.primary:
            left = "" if todo_rows is None else f", {todo_rows} left"
            say(f"resuming {out}: {kept} rows kept from complete chunks{left}. {recognised}")
        desc = f"extract (rank 0 of {group.world_size})" if group.world_size > 1 else "extract"
        bar = progress(show, todo_rows, desc, log_seconds) if group.primary else NoProgress()
        loop = Loop(extractor, out, device, bar=bar, tokens_before=tokens, todo_rows=todo_rows, **options)
        started = time.perf_counter()
        try:
            loop(batches)
        finally:
            batches.close()  # now, not when a traceback lets go: DataLoader workers shut down
            bar.close()
        loop.seconds = time.perf_counter() - started
    finally:
        for module, training in previous.items():
            module.training = training
    total = source.total if not by_prefix else skip + loop.rows_done
    return loop, total


def _stored_prefix(out: Path) -> tuple[int, int]:
    """``(rows, tokens)`` of rows ``[0, n)`` already in complete chunks; later chunks (after
    a gap) are removed: without a row count, only a prefix can be resumed."""
    chunks = complete_chunks(out)
    skip = uncovered(chunks, 0, 2**62)[0][0]
    tokens = 0
    for c in chunks:
        if c.start >= skip:
            shutil.rmtree(c.path, ignore_errors=True)
        else:
            tokens += chunk_tokens(c)
    return skip, tokens


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


__all__ = ["extract", "load"]
