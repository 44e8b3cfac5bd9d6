"""Sentence embeddings with fxcapture: masked mean pooling, then nearest neighbours.

Run: ``python examples/sentence_embeddings.py [--out DIR] [--query TEXT]``. A small
BERT with random weights is built from transformers' config (nothing is downloaded),
texts are tokenized byte by byte, and :func:`fxcapture.extract` stores the mean of the
last layer's hidden states over the *real* tokens of every sentence (the attention
mask is passed to the reducer, so padding never enters the average: a sentence embeds
the same alone or in a padded batch). Neighbours are found by cosine similarity.

The corpus is built in: sentences on three topics. With random weights an embedding
only reflects which bytes a sentence holds, so topic agreement is modest; load a real
model folder with ``fxcapture extract --model hf:PATH`` for meaningful neighbours.

Running again with the same ``--out`` finds the finished output and does not recompute
it (an interrupted run resumes); without ``--out`` a temporary folder is used and removed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from fxcapture import capture, extract
from fxcapture.dataset.reduce import reduce_mean
from fxcapture.dataset.text import ByteTokenizer, TextDataset

CORPUS = {
    "cooking": [
        "slice the onions and fry them in butter until golden",
        "bake the bread in a hot oven for forty minutes",
        "stir the soup and season it with salt and pepper",
        "whisk the eggs with sugar before folding in the flour",
        "roast the vegetables with olive oil and garlic",
        "simmer the tomato sauce slowly for an hour",
    ],
    "space": [
        "the rocket launched toward the orbit of the moon",
        "astronauts docked with the space station at dawn",
        "the telescope observed a distant galaxy of stars",
        "a comet passed close to the orbit of jupiter",
        "the probe landed on the surface of mars",
        "satellites circle the earth in low orbit",
    ],
    "football": [
        "the striker scored a goal in the final minute",
        "the goalkeeper saved a penalty kick in the match",
        "the team won the league after a long season",
        "the referee showed a red card to the defender",
        "fans cheered as the ball hit the back of the net",
        "the coach changed tactics at half time of the match",
    ],
}  # fmt: skip


def build_model(layers: int = 2, width: int = 64) -> tuple[torch.nn.Module, ByteTokenizer]:
    """A random-weight BERT (seeded: a rerun builds the same model) and a byte tokenizer."""
    import transformers

    config = transformers.AutoConfig.for_model(
        "bert", num_hidden_layers=layers, hidden_size=width, num_attention_heads=max(1, width // 32),
        intermediate_size=4 * width, vocab_size=257,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval(), ByteTokenizer(257)


def nearest(embeddings: np.ndarray, k: int = 3) -> np.ndarray:
    """Indices of the ``k`` nearest rows of each row by cosine similarity (itself excluded)."""
    x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(embeddings, dtype=np.float32)), dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices.numpy()


def embed_one(model: torch.nn.Module, tokenizer: ByteTokenizer, layer: str, text: str) -> np.ndarray:
    """One text's embedding straight from :func:`fxcapture.capture` (no store)."""
    batch = tokenizer([text], padding=True, return_tensors="pt")
    with torch.no_grad():
        _, feats = capture(model, [layer])(**batch)
    return reduce_mean(feats[layer], batch["attention_mask"])[0].numpy()


def run(out: Path, args: argparse.Namespace) -> dict:
    model, tokenizer = build_model(args.layers, args.width)
    layer = f"encoder.layer.{args.layers - 1}"
    texts = [t for sentences in CORPUS.values() for t in sentences]
    topics = np.repeat(np.arange(len(CORPUS)), [len(s) for s in CORPUS.values()])
    data = TextDataset(texts, tokenizer, max_length=128, sort_window=4 * args.batch_size)
    state = "finished" if (out / "manifest.json").exists() else "resuming" if out.exists() else "new"
    if state == "new":  # extract itself says when it resumes or finds the output complete
        print(f"embedding {len(texts)} sentences into {out}")
    feats = extract(model, {"embedding": layer}, data, out=out, reduce="mean", batch_size=args.batch_size,
                    data_name="sentence_embeddings.CORPUS", progress=False)  # fmt: skip
    stored = np.array(feats["embedding"])  # a writable copy (a slice of a column maps the files read-only)
    embeddings = np.empty_like(stored)
    embeddings[data.documents] = stored  # rows were sorted by length: back to corpus order
    neighbours = nearest(embeddings, args.k)
    agreement = float((topics[neighbours] == topics[:, None]).mean())
    for i in (0, len(texts) - 1):
        print(f"  {texts[i]!r}\n    nearest: {[texts[j] for j in neighbours[i]]}")
    print(f"neighbours on the same topic: {agreement:.0%} (chance {1 / len(CORPUS):.0%}; random weights)")
    result = {"embeddings": embeddings, "texts": texts, "neighbours": neighbours, "agreement": agreement,
              "layer": layer, "state": state}  # fmt: skip
    if args.query:
        query = embed_one(model, tokenizer, layer, args.query)
        sims = torch.nn.functional.cosine_similarity(torch.from_numpy(embeddings), torch.from_numpy(query)[None])
        best = sims.topk(args.k).indices.tolist()
        print(f"query {args.query!r}: {[texts[j] for j in best]}")
        result.update(query=query, query_neighbours=best)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the embeddings go (default: a temporary folder, removed)")
    parser.add_argument("--query", default=None, help="also find the sentences nearest to this text")
    parser.add_argument("--k", type=int, default=3, help="neighbours per sentence")
    parser.add_argument("--layers", type=int, default=2, help="BERT layers")
    parser.add_argument("--width", type=int, default=64, help="BERT hidden size")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    if args.out is not None:
        return run(Path(args.out), args)
    with tempfile.TemporaryDirectory(prefix="fxcapture-sentences-") as work:
        return run(Path(work) / "embeddings", args)


if __name__ == "__main__":
    main()
