"""Bad command lines: exit 2 (1 for a fault that is not the command line's), one line on
stderr naming the problem and the fix, no traceback; Ctrl-C exits 130; cheap checks come
before the model is traced (the trace is replaced by a failure to show it never ran)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fxcapture import cli
from fxcapture.cli import attention, names

pytest.importorskip("matplotlib")

GPT2 = "n_layer=1,n_embd=32,n_head=2,vocab_size=100,n_positions=32,bos_token_id=1,eos_token_id=2"


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"fxcapture {argv[0]}: ")]
    assert lines and lines[0].startswith(f"fxcapture {argv[0]}: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--model", "hf-config:gpt2", "--config-overrides", "n_layer=abc"],
     "gpt2's n_layer takes int values, got 'abc' (e.g. n_layer=12)"),
    (["--model", "hf-config:gpt2", "--config-overrides", GPT2, "--data", "synthetic:2"],
     "hf-config:gpt2 is a text model (it takes token ids), but the input is images: give text --data"),
    (["--text-field", "body"], "--text-field applies to text data, but --data 'synthetic:2' is image: leave it out"),
    (["--names", "blockz.0"], "'blockz.0' is not a module of TinyViT. Did you mean 'blocks.0'"),
    (["--model", "hf-config:gpt2", "--config-overrides", GPT2, "--data", "synthetic-text:2", "--names",
      "transformer.h.0"], "'transformer.h.0' is not a module of GPT2Model. Did you mean 'h.0'?"),
    (["--reduce", "cls", "--names", "patch_embed"], "'cls' picks tokens of a (batch, tokens, dim) value, got "
     "shape (2, 96, 8, 8): use 'mean', 'max' or 'flatten' (a feature map has no tokens)"),
])  # fmt: skip
def test_extract_bad_inputs(tmp_path, capsys, argv, message):
    args = {"--model": "demo:vit", "--names": "blocks.0", "--data": "synthetic:2", "--out": str(tmp_path / "o")}
    args.update(dict(zip(argv[::2], argv[1::2])))
    line = one_line_error(capsys, ["extract", *[x for kv in args.items() for x in kv], "--no-progress"])
    assert message in line


@pytest.mark.parametrize("out, message", [
    ("a-file", "--out {tmp}/a-file is a file, not a folder: choose a new or empty folder"),
    ("a-file/sub", "cannot create --out {tmp}/a-file/sub: {tmp}/a-file is a file, not a folder"),
])  # fmt: skip
def test_an_unusable_out_is_named_before_the_model_is_built(tmp_path, capsys, monkeypatch, out, message):
    (tmp_path / "a-file").write_text("mine")
    monkeypatch.setattr("fxcapture.cli.extract.build_model", lambda *a: pytest.fail("the model was built"))
    line = one_line_error(capsys, ["extract", "--model", "demo:vit", "--names", "blocks.0", "--data", "synthetic:2",
                                   "--out", str(tmp_path / out)])  # fmt: skip
    assert message.format(tmp=tmp_path) in line
    assert (tmp_path / "a-file").read_text() == "mine"


def test_misspelled_names_and_chunk_size_are_refused_before_any_trace(tmp_path, capsys, no_trace):
    base = ["extract", "--model", "demo:vit", "--data", "synthetic:2", "--out", str(tmp_path / "o")]
    assert "Did you mean 'blocks.1.attn'" in one_line_error(capsys, base + ["--names", "blocks.1x.attn"])
    with pytest.raises(SystemExit) as stop:
        cli.main(base + ["--names", "blocks.0", "--chunk-size", "0"])
    assert stop.value.code == 2 and "--chunk-size: must be a positive number, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_attention_bad_inputs(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not weights\n")
    out = ["--out", str(tmp_path / "maps")]
    line = one_line_error(capsys, ["attention", "demo:vit", "--weights", str(tmp_path / "notes.txt"), *out])
    assert f"--weights {tmp_path / 'notes.txt'}: not a torch state_dict file" in line
    assert "give a file written by torch.save(model.state_dict(), path)" in line
    line = one_line_error(capsys, ["attention", "demo:vit", "--image", str(tmp_path), *out])
    assert line.endswith(f"--image {tmp_path} is a folder: give one file")
    line = one_line_error(capsys, ["attention", "torchvision:squeezenet1_0", *out])
    assert "torchvision:squeezenet1_0 has no attention layers" in line and "needs a transformer" in line
    line = one_line_error(capsys, ["attention", "demo:vit", "--image-size", "40", *out])
    assert "--image-size 40: demo:vit does not take 40x40 images (" in line
    assert line.endswith("leave --image-size out for its 64x64")
    assert not (tmp_path / "maps").exists()


def test_attention_image_size_a_timm_vit_refuses(tmp_path, capsys):
    pytest.importorskip("timm")
    line = one_line_error(capsys, ["attention", "timm:vit_tiny_patch16_224", "--image-size", "100",
                                   "--out", str(tmp_path / "maps")])  # fmt: skip
    assert "--image-size 100: timm:vit_tiny_patch16_224 does not take 100x100 images" in line
    assert "doesn't match model (224)" in line and "its 224x224" in line


def test_any_other_error_is_one_line_and_ctrl_c_is_130(capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("the model's own bug\nsecond line")

    monkeypatch.setattr(names, "build_model", fails)
    line = one_line_error(capsys, ["names", "demo:vit"], code=1)
    assert line == "fxcapture names: error: RuntimeError: the model's own bug"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attention, "build_model", interrupted)  # Ctrl-C while the model is built
    assert cli.main(["attention", "demo:vit"]) == 130
    err = capsys.readouterr().err
    assert err == "fxcapture attention: interrupted\n"


# what the `fxcapture` console script runs, with Ctrl-C pressed while torch is imported
CTRL_C_DURING_IMPORT = """
import sys
class CtrlCOnTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlCOnTorch())
from fxcapture.cli import main
sys.exit(main())
"""


def test_ctrl_c_while_torch_is_imported_is_130_without_a_traceback():
    done = subprocess.run([sys.executable, "-c", CTRL_C_DURING_IMPORT, "demo"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert (done.returncode, done.stderr) == (130, "fxcapture: interrupted\n")


def test_an_os_error_is_a_sentence_not_an_errno(capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/data/x.pt")

    monkeypatch.setattr(names, "build_model", missing)
    assert one_line_error(capsys, ["names", "demo:vit"]) == (
        "fxcapture names: error: /data/x.pt: no such file or directory"
    )


@pytest.mark.parametrize("argv, message", [
    (["--model", "demo:vit", "--data", "synthetic:2"], "--generate-max-new-tokens applies to text data"),
    (["--model", "torchvision:resnet18", "--data", "synthetic-text:2"], "needs a transformers language model"),
])  # fmt: skip
def test_generate_on_image_data_or_a_model_without_generate(tmp_path, capsys, no_trace, argv, message):
    line = one_line_error(capsys, ["extract", *argv, "--names", "layer1", "--generate-max-new-tokens", "3",
                                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert message in line
    assert not (tmp_path / "o").exists()


def test_generate_max_new_tokens_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["extract", "--model", "hf-config:gpt2", "--names", "h.0", "--data", "synthetic-text:2",
                  "--generate-max-new-tokens", "0", "--out", str(tmp_path / "o")])  # fmt: skip
    assert stop.value.code == 2 and "--generate-max-new-tokens: must be a positive number, got 0" in capsys.readouterr().err
