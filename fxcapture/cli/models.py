"""Model specs for the command line: ``torchvision:resnet50``, ``timm:vit_small_patch16_224``,
``demo:vit``, ``hf:PATH`` (a transformers model saved in a local folder) and
``hf-config:TYPE`` (transformers' default config for a model type, e.g. ``gpt2``,
``bert``, ``llama``; shrink it with ``config_overrides``). Nothing is downloaded:
models are built with random weights (a ``state_dict`` file can be loaded on top),
except ``hf:PATH``, whose weights are in the folder.

Example::

    >>> model = build_model("torchvision:resnet18")
    >>> example_input(model).shape
    torch.Size([1, 3, 224, 224])
    >>> gpt = build_model("hf-config:gpt2", config_overrides=parse_overrides("n_layer=2,n_embd=64"))
    >>> build_tokenizer("hf-config:gpt2", gpt)
    ByteTokenizer(vocab_size=50257, pad_token_id=0)
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..dataset.text import ByteTokenizer


class Attention(nn.Module):
    """Multi-head self-attention with the attention map in the local ``attn``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.heads))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small vision transformer (the built-in default model of the CLI and demo)."""

    def __init__(
        self, image_size: int = 64, patch: int = 8, dim: int = 96, depth: int = 4,
        heads: int = 3, num_classes: int = 10,
    ) -> None:  # fmt: skip
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _torchvision(name: str, overrides: Mapping[str, Any]) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise ValueError(_unknown("torchvision", name, known))
    kwargs = {"weights": None}
    if "fasterrcnn" in name or "retinanet" in name or "maskrcnn" in name or "ssd" in name:
        kwargs["weights_backbone"] = None
    return torchvision.models.get_model(name, **kwargs)


def _timm(name: str, overrides: Mapping[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ValueError("timm models need `pip install timm`") from err
    known = timm.list_models()
    if name not in known:
        raise ValueError(_unknown("timm", name, known))
    return timm.create_model(name, pretrained=False)


def _demo(name: str, overrides: Mapping[str, Any]) -> nn.Module:
    if name != "vit":
        raise ValueError(_unknown("demo", name, ["vit"]))
    return TinyViT()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("hf: and hf-config: models need `pip install transformers`") from err
    return transformers


def _auto(causal_lm: bool) -> Any:
    """The auto class: the base model (hidden states are its outputs), or with its
    language-modeling head (``generate`` needs the logits)."""
    transformers = _transformers()
    return transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel


def _hf(path: str, overrides: Mapping[str, Any], causal_lm: bool = False) -> nn.Module:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"hf:{path}: no config.json in {folder}: give a folder written by model.save_pretrained() "
            "(nothing is downloaded)"
        )
    return _auto(causal_lm).from_pretrained(str(folder), local_files_only=True)


def _hf_config(model_type: str, overrides: Mapping[str, Any], causal_lm: bool = False) -> nn.Module:
    """A random-weight ``AutoModel`` (no task head: hidden states are its outputs), or
    ``AutoModelForCausalLM`` with ``causal_lm``."""
    transformers = _transformers()
    known = list(transformers.CONFIG_MAPPING.keys())
    if model_type not in known:
        raise ValueError(_unknown("hf-config", model_type, known))
    default = transformers.AutoConfig.for_model(model_type)
    unknown = [k for k in overrides if not hasattr(default, k)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(default.to_dict()), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"--config-overrides: {model_type} configs have no {unknown[0]!r}{hint}")
    for key, value in overrides.items():
        _check_override(model_type, key, value, getattr(default, key))
    try:
        config = transformers.AutoConfig.for_model(model_type, **overrides)
    except Exception as err:  # transformers validates fields with its own exception types
        raise ValueError(f"--config-overrides: {model_type} refuses {dict(overrides)} ({_first_line(err)})") from err
    try:
        return _auto(causal_lm).from_config(config)
    except ValueError as err:
        what = "causal language model" if causal_lm else "base model"
        raise ValueError(f"hf-config:{model_type} has no {what} class ({err})") from err


def _check_override(model_type: str, key: str, value: Any, default: Any) -> None:
    """An override of a number (or a flag) must be one: ``n_layer=abc`` is refused by name."""
    kinds = {bool: (bool,), int: (int,), float: (int, float)}
    want = kinds.get(type(default))
    if want is not None and value is not None and (not isinstance(value, want) or
                                                   (want != (bool,) and isinstance(value, bool))):  # fmt: skip
        raise ValueError(
            f"--config-overrides: {model_type}'s {key} takes {type(default).__name__} values, got {value!r} "
            f"(e.g. {key}={default!r})"
        )


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(err).__name__


_SOURCES = {"torchvision": _torchvision, "timm": _timm, "demo": _demo, "hf": _hf, "hf-config": _hf_config}


def _unknown(source: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close else ""
    return f"unknown {source} model {name!r}.{hint}"


def build_model(spec: str, weights: str | Path | None = None, config_overrides: Mapping[str, Any] | None = None,
                causal_lm: bool = False) -> nn.Module:  # fmt: skip
    """Build ``"source:name"`` (random weights but for ``hf:PATH``), then load ``weights`` if
    given; ``config_overrides`` change an ``hf-config:`` model's config (``{"n_layer": 2}``);
    ``causal_lm``: a transformers model with its language-modeling head (for ``generate``)."""
    source, sep, name = spec.partition(":")
    if not sep or source not in _SOURCES or not name:
        raise ValueError(
            f"bad model spec {spec!r}: use SOURCE:NAME with SOURCE one of "
            f"{', '.join(_SOURCES)}, e.g. torchvision:resnet50, demo:vit, hf:./my-model or hf-config:gpt2"
        )
    if config_overrides and source != "hf-config":
        raise ValueError(f"--config-overrides applies to hf-config: models, not {spec!r}")
    if causal_lm and source not in ("hf", "hf-config"):
        raise ValueError(f"generating text needs a transformers language model (hf:PATH or hf-config:TYPE), "
                         f"not {spec!r}: leave --generate-max-new-tokens out")  # fmt: skip
    model = _SOURCES[source](name, dict(config_overrides or {}), **({"causal_lm": True} if causal_lm else {}))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a ``state_dict`` file (or ``{"state_dict": ...}``) into ``model``; a file of
    another model fails with one line naming the missing and unexpected keys."""
    existing_file(weights, "--weights")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # a text file or another format fails anywhere in the unpickler
        raise ValueError(
            f"--weights {weights}: not a torch state_dict file ({type(err).__name__}: {_first_line(err)}); "
            "give a file written by torch.save(model.state_dict(), path)"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {weights}: holds a {type(state).__name__}, not a state_dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ValueError(f"--weights {weights} does not fit this model: {'; '.join(lines[:3]) or err}") from err
    found = {"missing": result.missing_keys, "unexpected": result.unexpected_keys}
    problems = [f"{len(keys)} {what} keys ({_some(keys)})" for what, keys in found.items() if keys]
    if problems:
        raise ValueError(f"--weights {weights} does not fit this model: {', '.join(problems)}")


def existing_file(path: str | Path, option: str) -> Path:
    """``path`` if it is a file; an error naming ``option`` and what is there instead."""
    found = Path(path)
    if found.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder: give one file")
    if not found.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    return found


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"n_layer=2,n_embd=64,tie=false"`` -> ``{"n_layer": 2, "n_embd": 64, "tie": False}``."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config-overrides: {item!r} is not KEY=VALUE (e.g. n_layer=2,n_embd=64)")
        overrides[key.strip()] = _literal(value.strip())
    return overrides


def _literal(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            f"{type(model).__name__} is not a transformers language model: text --data needs "
            "--model hf:PATH or hf-config:TYPE"
        )
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")  # fmt: skip


def build_tokenizer(spec: str, model: nn.Module) -> Any:
    """The tokenizer of ``hf:PATH`` (from the folder), or a :class:`ByteTokenizer` sized to an
    ``hf-config:`` model's vocabulary."""
    source, _, name = spec.partition(":")
    config = _config(model)
    if source == "hf":
        hint = "save one there with tokenizer.save_pretrained(PATH)"
        if not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):  # transformers would make an empty one
            raise ValueError(f"hf:{name} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {hint}")
        try:
            return _transformers().AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"hf:{name}: its tokenizer does not load ({str(err).splitlines()[0]}): {hint}") from err
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(f"{spec}: the config has no vocab_size, so no byte tokenizer can be made for it")
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    return ByteTokenizer(vocab, pad_token_id=pad, model_max_length=max_positions(model))


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a transformers model takes (its position embeddings), if known."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects, from timm's config or torchvision defaults."""
    if isinstance(model, TinyViT):
        return (3, model.image_size, model.image_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if cfg and "input_size" in cfg:
        return tuple(cfg["input_size"])
    size = getattr(model, "image_size", 224)
    return (3, size, size)


def example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, *input_size(model))


def takes_text(model: nn.Module) -> bool:
    """Does the model take token ids (a transformers config with a vocabulary and no image size)?"""
    config = getattr(model, "config", None)
    return isinstance(getattr(config, "vocab_size", None), int) and not hasattr(config, "image_size")


def check_takes_images(model: nn.Module, spec: str, size: int | None) -> None:
    """Refuse, before any trace, image input the model cannot take: a text model, or an
    ``--image-size`` the model refuses (one forward of a blank image: cheaper than a trace)."""
    if takes_text(model):
        raise ValueError(
            f"{spec} is a text model (it takes token ids), but the input is images: give text --data "
            "(a .txt, .jsonl or .parquet file, or synthetic-text:N)"
        )
    channels, height, width = input_size(model)
    if size is None or (size, size) == (height, width):
        return
    try:
        with torch.inference_mode():
            model(torch.zeros(1, channels, size, size))
    except Exception as err:
        raise ValueError(
            f"--image-size {size}: {spec} does not take {size}x{size} images ({_first_line(err)}); "
            f"leave --image-size out for its {height}x{width}"
        ) from err


def example_call(model: nn.Module, batch_size: int = 2) -> Any:
    """Example inputs for tracing by running: token ids for a language model (a
    ``config.vocab_size``), an image batch otherwise (see ``capture(example_inputs=)``)."""
    if takes_text(model):
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch_size, 16), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return example_input(model, batch_size)


# -- `fxcapture names MODEL` ------------------------------------------------------
