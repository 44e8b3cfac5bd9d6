"""Text corpora as datasets of token windows, ready for ``extract``.

:class:`TextDataset` tokenizes every document once (kept as one flat int32 array),
cuts long documents into windows (``max_length`` tokens, a new window every
``stride`` tokens) and batches them with its ``collate_fn`` into the dict a
tokenizer gives: ``input_ids`` and ``attention_mask``, padded on the tokenizer's side
(left or right). ``sort_window`` orders the samples by length inside consecutive
blocks of that many samples, so that a batch holds windows of similar length and
little padding. The stored rows follow the dataset's order, which is deterministic;
``documents[i]`` and ``starts[i]`` say which document and which token of it row ``i``
begins at.

Example::

    >>> data = TextDataset(["a short one", "and a longer document"], ByteTokenizer(100), max_length=8, stride=8)
    >>> len(data), data.documents.tolist(), data.starts.tolist()
    (5, [0, 0, 1, 1, 1], [0, 8, 0, 8, 16])
    >>> data.collate_fn([data[0], data[1]])["attention_mask"].tolist()
    [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

TOKENIZE_CHUNK = 1024  # documents per tokenizer call


# -- a tokenizer for random-weight models --------------------------------------------------
def pad_ids(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``sequences`` padded to ``width`` (default: the longest)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in sequences), default=0) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes as token ids below ``vocab_size`` (id 0 is padding): a stand-in for
    models built from a config, whose vocabulary means nothing anyway. Called like a
    transformers tokenizer.

    Example::

        >>> tok = ByteTokenizer(vocab_size=100, padding_side="left")
        >>> tok(["hi", "abc"], padding=True, return_tensors="pt")["attention_mask"].tolist()
        [[0, 1, 1], [1, 1, 1]]
    """

    def __init__(self, vocab_size: int = 257, pad_token_id: int = 0, padding_side: str = "right",
                 model_max_length: int | None = None) -> None:  # fmt: skip
        if vocab_size < 2:
            raise ValueError(f"a byte tokenizer needs a vocabulary of at least 2 ids, got {vocab_size}")
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id {pad_token_id} is not below vocab_size {vocab_size}")
        self.vocab_size, self.pad_token_id, self.padding_side = vocab_size, pad_token_id, padding_side
        self.model_max_length = model_max_length
        ids = [i for i in range(vocab_size) if i != pad_token_id]
        self._table = [ids[b % len(ids)] for b in range(256)]

    def encode(self, text: str) -> list[int]:
        return [self._table[b] for b in text.encode("utf-8")]

    def __call__(self, texts: str | Sequence[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None, **_: Any) -> dict:  # fmt: skip
        """``{"input_ids", "attention_mask"}``: lists, or padded tensors with ``return_tensors="pt"``."""
        single = isinstance(texts, str)
        ids = [self.encode(t) for t in ([texts] if single else texts)]
        if truncation and max_length is not None:
            ids = [s[:max_length] for s in ids]
        if return_tensors is None and not padding:
            masks = [[1] * len(s) for s in ids]
            return {"input_ids": ids[0] if single else ids, "attention_mask": masks[0] if single else masks}
        if return_tensors not in (None, "pt"):
            raise ValueError(f"ByteTokenizer returns torch tensors only (return_tensors='pt'), not {return_tensors!r}")
        width = max_length if padding == "max_length" else None
        input_ids, mask = pad_ids(ids, self.pad_token_id, self.padding_side, width)
        if return_tensors is None:
            return {"input_ids": input_ids.tolist(), "attention_mask": mask.tolist()}
        return {"input_ids": input_ids, "attention_mask": mask}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, pad_token_id={self.pad_token_id})"


# -- corpora --------------------------------------------------------------------------------
WORDS = ("the a of to in and is it that was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out "
         "them then she many some so these would other into has more her two like him see time").split()  # fmt: skip


def synthetic_texts(n: int, seed: int = 0, max_words: int = 64) -> list[str]:
    """``n`` random documents of 1 to ``max_words`` words, each seeded by its index."""
    texts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        words = rng.integers(0, len(WORDS), rng.integers(1, max_words + 1))
        texts.append(" ".join(WORDS[w] for w in words))
    return texts


def _read_txt(path: Path, field: str) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not JSON ({err.msg})") from err
            if not isinstance(row, dict) or field not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{line_number} has no field {field!r} (it has {fields}): pass --text-field")
            texts.append(str(row[field]))
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from err
    names = pq.read_schema(path).names
    if field not in names:
        raise ValueError(f"{path} has no column {field!r} (it has {names}): pass --text-field")
    return [str(t) for t in pq.read_table(path, columns=[field]).column(field).to_pylist()]


READERS: dict[str, Callable[[Path, str], list[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_texts(spec: str | Path, text_field: str = "text", seed: int = 0) -> list[str]:
    """The documents of a ``.txt`` file (one per line), a ``.jsonl`` or ``.parquet`` file
    (the ``text_field`` of each row), or ``synthetic-text:N``.

    Example::

        >>> len(read_texts("synthetic-text:10"))
        10
    """
    spec = str(spec)
    if spec.startswith("synthetic-text:"):
        count = spec.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{spec!r}: use synthetic-text:N with N a positive number of documents")
        return synthetic_texts(int(count), seed)
    path = Path(spec)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{spec!r}: text data is a {', '.join(READERS)} file or synthetic-text:N")
    if not path.is_file():
        raise FileNotFoundError(f"{spec!r}: no such file")
    return reader(path, text_field)


def is_text_spec(spec: str) -> bool:
    """Does ``--data spec`` name text (a ``.txt``/``.jsonl``/``.parquet`` file or ``synthetic-text:N``)?"""
    return spec.startswith("synthetic-text:") or Path(spec).suffix.lower() in READERS


# -- the dataset ----------------------------------------------------------------------------
def _windows(length: int, max_length: int | None, stride: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` of the samples cut from a document of ``length`` tokens."""
    if length == 0:
        return []
    if max_length is None:
        return [(0, length)]
    if stride is None:
        return [(0, min(length, max_length))]
    spans = []
    for start in range(0, length, stride):
        spans.append((start, min(start + max_length, length)))
        if start + max_length >= length:
            break
    return spans


def _check_window(max_length: int | None, stride: int | None) -> None:
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if stride is not None:
        if max_length is None:
            raise ValueError("stride cuts windows of max_length tokens: give max_length too")
        if not 1 <= stride <= max_length:
            raise ValueError(
                f"stride must be between 1 and max_length ({max_length}) so no token is skipped, got {stride}"
            )


class TextDataset:
    """Tokenized documents as samples (windows of them with ``stride``), batched by
    :meth:`collate_fn` into ``{"input_ids", "attention_mask"}``.

    Args:
        texts: the documents (see :func:`read_texts`).
        tokenizer: a transformers tokenizer or :class:`ByteTokenizer`; special tokens
            it adds are part of the document (and of its first/last window).
        max_length: tokens per sample; longer documents are truncated, or cut into
            windows with ``stride``.
        stride: a new window every ``stride`` tokens (``stride == max_length``: no
            overlap); the last window of a document may be shorter.
        sort_window: order samples by length (longest first) inside consecutive blocks
            of this many samples (a few batches), to cut padding.
        padding_side: ``"left"`` or ``"right"`` (default: the tokenizer's).

    Documents without tokens give no sample. ``documents``, ``starts`` and ``lengths``
    hold, for each sample in order, its document index, first token and token count.

    Example::

        >>> data = TextDataset(read_texts("corpus.txt"), tokenizer, max_length=512, stride=256, sort_window=256)
        >>> extract(model, ["layers.6"], data, out="acts/", reduce="tokens", batch_size=32)
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, *, max_length: int | None = None,
                 stride: int | None = None, sort_window: int | None = None,
                 padding_side: str | None = None) -> None:  # fmt: skip
        _check_window(max_length, stride)
        if sort_window is not None and sort_window < 1:
            raise ValueError(f"sort_window must be >= 1 samples, got {sort_window}")
        self.padding_side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        pad_ids([], 0, self.padding_side)  # checks the side
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0  # masked out: any id does
        self.tokens, offsets = _tokenize(texts, tokenizer)
        spans = [(d, offsets[d] + a, b - a) for d in range(len(texts))
                 for a, b in _windows(int(offsets[d + 1] - offsets[d]), max_length, stride)]  # fmt: skip
        table = np.array(spans, dtype=np.int64).reshape(-1, 3)
        table = table[_length_order(table[:, 2], sort_window)]
        self.documents, self._flat_starts, self.lengths = table[:, 0], table[:, 1], table[:, 2]
        self.starts = self._flat_starts - offsets[self.documents]
        self.settings = dict(max_length=max_length, stride=stride, sort_window=sort_window,
                             padding_side=self.padding_side, documents=len(texts))  # fmt: skip

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} text samples")
        start, n = self._flat_starts[index], self.lengths[index]
        return {"input_ids": torch.from_numpy(self.tokens[start : start + n].astype(np.int64))}

    def collate_fn(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad ``items`` into ``{"input_ids", "attention_mask"}`` on ``padding_side``."""
        ids, mask = pad_ids([item["input_ids"] for item in items], self.pad_id, self.padding_side)
        return {"input_ids": ids, "attention_mask": mask}

    def data_name(self) -> str:
        """How the manifest names the samples: the settings and a hash of the tokens."""
        digest = hashlib.sha256(self.tokens.tobytes()).hexdigest()[:16]
        options = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"TextDataset[{len(self)} samples, {options}, tokens {digest}]"


def _tokenize(texts: Sequence[str], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """All documents' token ids as one flat int32 array, and ``len(texts) + 1`` offsets."""
    parts, lengths = [], []
    for lo in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = [str(t) for t in texts[lo : lo + TOKENIZE_CHUNK]]
        for ids in tokenizer(chunk)["input_ids"]:
            parts.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return tokens, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _length_order(lengths: np.ndarray, window: int | None) -> np.ndarray:
    """Sample order: as given, or longest first inside consecutive blocks of ``window``."""
    order = np.arange(len(lengths))
    if window is None:
        return order
    for lo in range(0, len(lengths), window):
        block = order[lo : lo + window]
        order[lo : lo + window] = block[np.argsort(-lengths[block], kind="stable")]
    return order
