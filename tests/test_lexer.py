"""The Pygments lexer for .cir: token stream of an example, no error tokens anywhere, registration."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from pygments.token import Comment, Error, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

from circuitir.render.lexer import CirLexer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.cir"))

SNIPPET = '''# a comment
circuitir 1
header:
  metrics."per task".quote = 0.1
  pipeline = ["trace", "dce"]
candidates 10 93  # '\\n' ']'
embed 5 = {34: 1.0, 39: -1.5e-3}
embed 6 = f32"AACAPwAA
    AEA="
layer 0 attn:
  norm 0.attn rms eps=1.1920929e-07 width=128
  head 3 sink=-1.25
    0.attn.q[48] bias=0.1
      label auto "on [ ("
      <- 0.attn.act_in[5] 0.25
    const 0.attn.q[49] = 0.01
'''


def stream(text):
    return [(token, value) for token, value in CirLexer().get_tokens(text) if token not in Whitespace]


def test_token_stream_of_a_snippet():
    tokens = stream(SNIPPET)
    assert tokens[:4] == [(Comment.Single, "# a comment"), (Keyword, "circuitir"), (Number.Integer, "1"),
                          (Keyword, "header")]
    assert (Name.Property, 'metrics."per task".quote') in tokens
    assert (String.Double, '"trace"') in tokens
    at = tokens.index((Keyword, "candidates"))
    assert tokens[at + 1:at + 4] == [(Number.Integer, "10"), (Number.Integer, "93"), (Comment.Single, "# '\\n' ']'")]
    assert (Number.Float, "-1.5e-3") in tokens
    assert [v for t, v in tokens if t is String.Other] == ['f32"', 'AACAPwAA\n    AEA=', '"']
    at = tokens.index((Keyword, "norm"))
    assert tokens[at:at + 9] == [(Keyword, "norm"), (Name.Variable, "0.attn"), (Keyword.Type, "rms"),
                                 (Name.Attribute, "eps"), (Operator, "="), (Number.Float, "1.1920929e-07"),
                                 (Name.Attribute, "width"), (Operator, "="), (Number.Integer, "128")]
    at = tokens.index((Keyword, "label"))
    assert tokens[at:at + 3] == [(Keyword, "label"), (Keyword.Type, "auto"), (String.Double, '"on [ ("')]
    at = tokens.index((Operator, "<-"))
    assert tokens[at:at + 6] == [(Operator, "<-"), (Name.Variable, "0.attn.act_in"), (Punctuation, "["),
                                 (Number.Integer, "5"), (Punctuation, "]"), (Number.Float, "0.25")]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_no_error_tokens_on_the_examples(path):
    text = path.read_text()
    tokens = list(CirLexer().get_tokens(text))
    assert not [t for t in tokens if t[0] in Error]
    assert "".join(v for _, v in tokens) == text if text.endswith("\n") else text + "\n"
    kinds = {t for t, _ in tokens}
    assert {Keyword, Name.Variable, Number.Float, Name.Attribute} <= kinds


def test_unknown_text_is_an_error_token():
    assert any(t in Error for t, _ in CirLexer().get_tokens("layer 0 attn:\n  @oops\n"))


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_registered_under_the_pygments_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["pygments.lexers"]["cir"]
    assert target == "circuitir.render.lexer:CirLexer"
    assert "cir" in CirLexer.aliases and "*.cir" in CirLexer.filenames


def test_pygments_finds_it_when_installed():
    installed = [e for e in importlib.metadata.entry_points(group="pygments.lexers") if e.name == "cir"]
    if not installed:
        pytest.skip("circuitir is not installed with this pyproject's entry points (pip install -e .)")
    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename

    assert isinstance(get_lexer_by_name("cir"), CirLexer)
    assert isinstance(get_lexer_for_filename("brackets.cir"), CirLexer)
