"""`fxcapture names`: the table, empty matches and CLI errors that name CLI commands."""

from __future__ import annotations

import pytest

import fxcapture
from fxcapture.cli import main
from fxcapture.cli.models import TinyViT


def test_names_prints_the_table_and_errors_name_the_cli(capsys):
    assert main(["names", "demo:vit", "blocks.0.*"]) == 0
    out = capsys.readouterr().out
    expected = fxcapture.list_names(TinyViT(), "blocks.0.*", kinds=("module", "local")).keys()
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == expected
    assert out.rstrip().endswith(f"({len(expected)} names)")

    assert main(["names", "demo:vit", "blocks.0.atn*"]) == 2
    err = capsys.readouterr().err
    assert "matches nothing" in err and "fxcapture names demo:vit" in err and "list_names" not in err
    assert main(["extract", "--model", "demo:vit", "--names", "blocks.0.atn", "--data", "synthetic:4",
                 "--out", "/nonexistent-never-written"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "Did you mean 'blocks.0.attn'" in err and "fxcapture names demo:vit" in err


def test_names_lists_attention_probabilities(capsys):
    assert main(["names", "demo:vit", "**:attn_probs"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == [f"blocks.{i}.attn:attn_probs" for i in range(4)]


def test_list_names_table_shows_itself():
    table = fxcapture.list_names(TinyViT(), "blocks.1.attn:*")
    assert repr(table) == f"{table}\n({len(table)} names)"
    assert str(table).splitlines()[0].split() == ["key", "kind", "module", "op"]
    assert table._repr_html_().count("<tr>") == len(table) + 1
    with pytest.raises(ValueError, match=r"not a capturable name.*Did you mean.*fxcapture\.list_names\(model\)"):
        fxcapture.list_names(TinyViT(), "blocks.1.attn:atn")
