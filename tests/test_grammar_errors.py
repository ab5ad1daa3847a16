"""Every way .cir text can be wrong ends in one CirSyntaxError that points at the statement.

Each case damages BASE (a small canonical circuit, line numbers in the
margin below) and checks the exact line and column, a key phrase of the
message, and the report's shape: ``file:line:col: message``, the line, a
caret under the column, then what was expected (syntax errors). No lark
exception and no traceback escape.
"""

from __future__ import annotations

import pytest

from circuitir.cli import main
from circuitir.errors import UserError
from circuitir.grammar import CirSyntaxError, format_text, parse

BASE = """\
circuitir 1

config:
  n_layer = 1
  n_head = 2
  d_head = 2
  d_model = 4
  d_mlp = 4
  vocab_size = 8

candidates 1 2

embed 0 = {1: 1.0}
embed 1 = {}

layer 0 attn:
  0.attn.act_in[0] gain=1.0
  head 1 sink=-1.25
    const 0.attn.q[2] = 0.5
    const 0.attn.q[3] = 0.0
    const 0.attn.k[2] = 0.0
    const 0.attn.k[3] = 0.0
    0.attn.v[2] bias=0.0
      <- 0.attn.act_in[0] 0.25
  0.attn.resid_delta[1] bias=0.0
    <- 0.attn.v[2] 2.0

final:
  final_resid[1] gain=1.0
  logits[0] bias=0.0
    <- final_resid[1] 1.5
  logits[1] bias=0.0
"""
# Lines: 1 version, 3 config, 11 candidates, 13-14 embed, 16 layer 0 attn, 17 act_in, 18 head 1,
# 19-22 q/k constants, 23 v[2], 24 its edge, 25 resid_delta, 26 its edge, 28 final, 29 final_resid,
# 30 logits[0], 31 its edge, 32 logits[1].


def damaged(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def error_of(text: str, filename: str = "t.cir") -> CirSyntaxError:
    with pytest.raises(CirSyntaxError) as info:
        parse(text, filename)
    return info.value


def check_error(text: str, line: int, column: int, phrase: str, expected: tuple[str, ...] = ()) -> CirSyntaxError:
    exc = error_of(text)
    report = str(exc).split("\n")
    assert (exc.line, exc.column) == (line, column), str(exc)
    assert phrase in exc.message, str(exc)
    assert report[0] == f"t.cir:{line}:{column}: {exc.message}"
    assert report[1] == text.split("\n")[line - 1]
    assert report[2] == " " * (column - 1) + "^"
    for word in expected:
        assert word in report[3], str(exc)
    assert len(report) == (4 if expected else 3)
    # Nothing from lark (or any other exception) rides along.
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    assert isinstance(exc, UserError)
    return exc


def test_base_is_valid_and_canonical():
    assert format_text(BASE) == BASE


# ---------------------------------------------------------------- syntax

def test_unexpected_word():
    exc = check_error(damaged("    0.attn.v[2] bias=0.0\n", "    0.attn.v[2] bias=0.0 oops\n"), 23, 26,
                      "unexpected `oops`", ("an attribute such as bias=0.5", "end of line"))
    assert str(exc).split("\n")[3].startswith("expected one of: ")


def test_missing_weight_on_an_edge():
    check_error(damaged("<- 0.attn.act_in[0] 0.25", "<- 0.attn.act_in[0]"), 24, 26, "unexpected end of line",
                ("a number",))


def test_unexpected_character_in_a_table():
    check_error(damaged("embed 0 = {1: 1.0}", "embed 0 = {1: 1.0]"), 13, 18, "unexpected `]`", ("`,`", "`}`"))


def test_block_header_without_colon():
    check_error(damaged("layer 0 attn:", "layer 0 attn"), 16, 13, "unexpected end of line", ("`:`",))


def test_unknown_sublayer():
    check_error(damaged("layer 0 attn:", "layer 0 attention:"), 16, 9, "unexpected `attention:`",
                ("`attn` or `mlp`",))


def test_statement_outside_a_block():
    check_error(damaged("embed 1 = {}\n", "embed 1 = {}\n0.attn.act_in[0] gain=1.0\n"), 15, 1,
                "unexpected `0.attn.act_in[0]`", ("`embed`", "`layer`", "`final`"))


def test_missing_version_line():
    check_error(BASE.replace("circuitir 1\n\n", ""), 1, 1, "unexpected `config:`", ("`circuitir`",))


def test_unexpected_end_of_file():
    text = BASE[:BASE.index("{1: 1.0}") + 7]
    check_error(text, 13, 18, "unexpected end of file", ("`}`",))


def test_empty_file():
    check_error("", 1, 1, "unexpected end of file", ("`circuitir`",))


def test_comment_only_file():
    check_error("# nothing here\n", 2, 1, "unexpected end of file", ("`circuitir`",))


# ---------------------------------------------------------------- version

def test_unknown_version():
    check_error(BASE.replace("circuitir 1", "circuitir 2"), 1, 11, "unknown .cir language version 2")


def test_unknown_version_after_comments():
    check_error("# a comment\n\n  circuitir 17  # newer\n" + BASE.split("\n", 1)[1], 3, 13,
                "unknown .cir language version 17")


# ---------------------------------------------------------------- what the grammar cannot see

# (what to replace in BASE, with what, line, column, phrase of the message)
MEANING_ERRORS = {
    "edge from an undeclared node": ("<- 0.attn.act_in[0] 0.25", "<- 0.attn.act_in[3] 0.25", 24, 10,
                                     "edge 0.attn.act_in[3] -> 0.attn.v[2]: 0.attn.act_in[3] is not declared"),
    "edge from a node out of range": ("<- 0.attn.v[2] 2.0", "<- 0.attn.v[4] 2.0", 26, 17, "does not fit"),
    "head without its whole query": ("    const 0.attn.q[3] = 0.0\n", "", 18, 3,
                                     "q channel 3 is neither kept nor constant (a head needs its whole query"),
    "head without its whole key": ("    const 0.attn.k[2] = 0.0\n", "", 18, 3,
                                   "k channel 2 is neither kept nor constant"),
    "kept value of an undeclared head": ("  head 1 sink=-1.25\n", "", 22, 5, "its head 0.attn.head[1] is not declared"),
    "channel under the wrong head": ("    const 0.attn.q[3] = 0.0\n",
                                     "    const 0.attn.q[3] = 0.0\n    const 0.attn.q[1] = 0.0\n",
                                     21, 11, "belongs to head 0, but stands under `head 1`"),
    "node index out of range": ("    0.attn.v[2] bias=0.0", "    0.attn.v[7] bias=0.0", 23, 14,
                                "node 0.attn.v[7] does not fit: 0.attn.v has 4 channels"),
    "head out of range": ("  head 1 sink", "  head 2 sink", 18, 8, "head 2 does not fit"),
    "layer out of range": ("layer 0 attn:", "layer 1 attn:", 16, 7, "layer 1 does not exist"),
    "duplicate node": ("  0.attn.act_in[0] gain=1.0\n", "  0.attn.act_in[0] gain=1.0\n  0.attn.act_in[0] gain=2.0\n",
                       18, 3, "duplicate node 0.attn.act_in[0] (first at line 17)"),
    "duplicate edge": ("    <- final_resid[1] 1.5\n", "    <- final_resid[1] 1.5\n    <- final_resid[1] 2.5\n", 32, 8,
                       "duplicate edge final_resid[1] -> logits[0]"),
    "table of the wrong length": ("embed 1 = {}", 'embed 1 = f32"AACAPwAAAEA="', 14, 11,
                                  "the table has 2 values, expected 8 (vocab_size)"),
    "sparse table index out of range": ("embed 0 = {1: 1.0}", "embed 0 = {9: 1.0}", 13, 12,
                                        "table index 9 does not fit"),
    "bad base64": ("embed 1 = {}", 'embed 1 = f32"AAA"', 14, 11, "not valid base64"),
    "bad base64 in a table over several lines": ("embed 1 = {}", 'embed 1 = f32"\n    AACAPwAAAEA=\n    AAA="', 14, 11,
                                                 "not valid base64"),
    "unknown site": ("  0.attn.resid_delta[1] bias", "  0.attn.resid[1] bias", 25, 3, "unknown site 0.attn.resid"),
    "node in the wrong block": ("  final_resid[1] gain=1.0", "  0.mlp.act_in[1] gain=1.0", 29, 3,
                                "it belongs in `layer 0 mlp`"),
    "node with no path to the output": ("  0.attn.act_in[0] gain=1.0\n",
                                        "  0.attn.act_in[0] gain=1.0\n  0.attn.act_in[1] gain=1.0\n", 18, 3,
                                        "node 0.attn.act_in[1] has no path to the output"),
    "zero weight": ("<- final_resid[1] 1.5", "<- final_resid[1] 0.0", 31, 8, "weight must be finite and nonzero"),
    "weight out of float32 range": ("<- final_resid[1] 1.5", "<- final_resid[1] 1e39", 31, 23,
                                    "out of the float32 range"),
    "unknown attribute": ("final_resid[1] gain=1.0", "final_resid[1] gane=1.0", 29, 18,
                          "unknown attribute 'gane'"),
    "constant logits": ("  logits[1] bias=0.0", "  const logits[1] = 0.0", 32, 9, "is an output; it cannot be const"),
    "duplicate setting": ("  n_head = 2\n", "  n_head = 2\n  n_head = 3\n", 6, 3,
                          "duplicate setting n_head (first set at line 5)"),
    "setting both a value and a group": ("  n_head = 2\n", "  n_head = 2\n  n_head.x = 3\n", 6, 3,
                                         "n_head is a value (line 5)"),
    "missing config field": ("  d_mlp = 4\n", "", 3, 1, "config: d_mlp is missing"),
    "config field of the wrong type": ("  d_mlp = 4\n", "  d_mlp = 4.0\n", 8, 3,
                                       "d_mlp must be a positive whole number"),
    "config field that is a group": ("  d_mlp = 4\n", "  d_mlp.x = 4\n", 8, 3, "d_mlp must be a positive whole number"),
    "bad string escape": ("  vocab_size = 8\n", '  vocab_size = 8\n  name = "a\\qb"\n', 10, 10, "bad string"),
    "candidate outside the vocabulary": ("candidates 1 2", "candidates 1 20", 11, 14,
                                         "candidate token 20 does not fit"),
    "missing output": ("  logits[1] bias=0.0\n", "", 11, 1, "output logits[1] (candidate token 2) is not declared"),
    "norm in the wrong block": ("final:\n", "final:\n  norm 0.attn rms eps=1e-05 width=4\n", 29, 8,
                                "norm 0.attn stands in block `final`"),
    "norm without eps": ("final:\n", "final:\n  norm final rms width=4\n", 29, 3, "norm final needs eps="),
}


@pytest.mark.parametrize("case", MEANING_ERRORS, ids=str)
def test_meaning_error(case):
    old, new, line, column, phrase = MEANING_ERRORS[case]
    check_error(damaged(old, new), line, column, phrase)


def test_head_in_an_mlp_block():
    text = BASE + "\nlayer 0 mlp:\n  head 0\n"
    check_error(text, 35, 3, "a head stands in an attention block")


def test_norm_in_the_wrong_block():
    check_error(damaged("final:\n", "final:\n  norm 0.attn rms eps=1e-05 width=4\n"), 29, 8,
                "norm 0.attn stands in block `final`")


def test_norm_without_eps():
    check_error(damaged("final:\n", "final:\n  norm final rms width=4\n"), 29, 3, "norm final needs eps=")


def test_bigram_missing_a_column():
    text = BASE + "  bigram logits[1] = {}\n"
    check_error(text, 33, 3, "bigram column logits[0] is missing")


# ---------------------------------------------------------------- the CLI

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fmt_prints_the_located_report(tmp_path, capsys):
    path = tmp_path / "bad.cir"
    path.write_text(damaged("    0.attn.v[2] bias=0.0\n", "    0.attn.v[2] bias=0.0 oops\n"))
    code, out, err = run(capsys, "fmt", path)
    lines = err.rstrip("\n").split("\n")
    assert code == 2 and out == ""
    assert lines[0] == f"{path}:23:26: unexpected `oops`"
    assert lines[1] == "    0.attn.v[2] bias=0.0 oops" and lines[2] == " " * 25 + "^"
    assert lines[3].startswith("expected") and "Traceback" not in err


def test_fmt_formats_checks_and_rewrites(tmp_path, capsys):
    path = tmp_path / "c.cir"
    messy = BASE.replace("  0.attn.act_in[0] gain=1.0", "0.attn.act_in[0]   gain=1")
    path.write_text(messy)
    path.chmod(0o644)
    assert run(capsys, "fmt", path) == (0, BASE, "")
    code, out, err = run(capsys, "fmt", "--check", path)
    assert code == 1 and out == "" and str(path) in err
    assert path.read_text() == messy
    assert run(capsys, "fmt", "-i", path)[0] == 0
    assert path.read_text() == BASE and path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["c.cir"]  # written in place, atomically, nothing left over
    assert run(capsys, "fmt", "--check", path) == (0, "", "")


def test_fmt_on_a_missing_file(tmp_path, capsys):
    code, out, err = run(capsys, "fmt", tmp_path / "nope.cir")
    assert code == 2 and err.count("\n") == 1 and "nope.cir" in err
