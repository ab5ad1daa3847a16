"""The .cir language: golden examples, exact round trips, and the spelling of values.

``parse(emit(c)) == c`` for random valid circuits (hypothesis), and
``format_text(t) == t`` for the canonical, commented examples.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitir.grammar import CirSyntaxError, emit, format_text, parse
from circuitir.grammar import values as V
from circuitir.ir.circuit import CircuitError, Node, check_circuit

from cir_strategies import circuits

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.cir"))
QUOTE = Path(__file__).parent.parent / "examples" / "quote_toy.cir"


def f32(x: float) -> float:
    return float(np.float32(x))


@pytest.fixture
def quote():
    return parse(QUOTE.read_text())


# ---------------------------------------------------------------- examples (golden)

def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_canonical(path):
    text = path.read_text()
    assert format_text(text, str(path)) == text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_round_trips_and_is_valid(path):
    circuit = parse(path.read_text(), str(path))
    check_circuit(circuit)
    assert parse(emit(circuit)) == circuit
    config_keys = set(circuit.config)
    from circuitir.models.config import GPTConfig
    assert config_keys == set(GPTConfig().to_dict())


def test_comments_stay_out_of_the_ir():
    text = QUOTE.read_text()
    bare = emit(parse(text))
    assert "#" not in bare.replace("candidates 34 39  # '\"' \"'\"", "")
    assert parse(bare) == parse(text)


def test_quote_example_reads_as_expected(quote):
    assert quote.candidates == [34, 39]
    assert quote.heads == {(0, 0): None}
    assert quote.edges[Node("0.attn.act_in", 1), Node("0.attn.k", 0)] == 2.0
    assert quote.nodes[Node("0.attn.q", 0)].kind == "const"
    assert quote.nodes[Node("0.attn.q", 0)].value == 4.0
    assert quote.nodes[Node("logits", 1)].kind == "output"
    assert quote.header["source"] == {"model": "none: written by hand to show the language"}
    assert quote.norms["0.attn"].frozen_scale == 1.0
    assert quote.norms["0.attn"].eps == torch.finfo(torch.float32).eps
    assert quote.embed[0].dtype == torch.float32 and quote.embed[0][39] == -1.0


# ---------------------------------------------------------------- random circuits

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(circuits())
def test_random_circuits_round_trip_exactly(circuit):
    text = emit(circuit)
    back = parse(text)
    assert back == circuit
    assert emit(back) == text  # the emitted text is canonical: a fixed point of the formatter


# ---------------------------------------------------------------- floats

@pytest.mark.parametrize("x", [0.1, 1.0, -1.5, 1e-45, 1.4e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38,
                               16777217.0, 1e10, 123456.789, 2.0 ** -149, 0.0, -0.0, math.pi])
def test_weights_are_shortest_float32_decimals_that_round_trip(x):
    value = f32(x)
    text = V.format_f32(value)
    back = V.parse_f32(text)
    assert np.float32(back).view(np.uint32) == np.float32(value).view(np.uint32)
    mantissa = text.split("e")[0].lstrip("-").replace(".", "").strip("0")
    assert len(mantissa) <= 9  # float32 never needs more than 9 significant digits


def test_weight_spelling():
    assert V.format_f32(f32(0.1)) == "0.1"
    assert V.format_f32(-0.0) == "-0.0"
    assert V.format_f32(float("inf")) == "inf" and V.format_f32(float("-inf")) == "-inf"
    assert V.format_f32(float("nan")) == "nan"
    assert math.isnan(V.parse_f32("nan"))
    assert V.parse_f32("1") == 1.0


def test_a_float_that_is_not_float32_is_refused():
    with pytest.raises(V.ValueSpellingError, match="not a float32"):
        V.format_f32(0.1)
    with pytest.raises(V.ValueSpellingError, match="float32 range"):
        V.parse_f32("1e39")


def test_emit_refuses_a_circuit_with_a_float64_weight(quote):
    quote.edges[Node("0.attn.act_in", 1), Node("0.attn.k", 0)] = 0.1
    with pytest.raises(CircuitError, match=r"edge 0.attn.act_in\[1\] -> 0.attn.k\[0\].*not a float32"):
        emit(quote)


# ---------------------------------------------------------------- settings

def test_header_values_keep_their_types(quote):
    quote.header = {
        "int": 3, "float": 3.0, "big": 2 ** 80, "neg": -7, "tiny": 5e-324, "inf": float("-inf"),
        "str": 'a "quoted" \\ line\nwith\ttabs and ünïcode \u2028', "true": True, "false": False, "none": None,
        "list": [1, 2.5, "x", None, [True]], "empty": {}, "": "empty key", "a.b": "dotted key",
        "metrics": {"loss": 0.123456789012, "per task": {"quote": {"loss": 0.1, "n": 512}}},
    }
    text = emit(quote)
    assert "  metrics.\"per task\".quote.n = 512\n" in text
    assert '  "a.b" = "dotted key"\n' in text and "  float = 3.0\n" in text and "  int = 3\n" in text
    back = parse(text)
    assert back.header == quote.header
    for key in ("int", "float", "big", "true", "none", "list"):
        assert type(back.header[key]) is type(quote.header[key])
    assert back == quote


def test_nan_in_a_header(quote):
    quote.header["nan"] = float("nan")
    assert parse(emit(quote)) == quote


def test_a_setting_that_cannot_be_written_is_refused(quote):
    quote.header["tensor"] = torch.zeros(2)
    with pytest.raises(CircuitError, match="header tensor: a Tensor cannot be written"):
        emit(quote)
    quote.header = {1: "int key"}
    with pytest.raises(CircuitError, match="key 1"):
        emit(quote)


# ---------------------------------------------------------------- tables

def test_mostly_zero_tables_are_sparse_and_others_dense(quote):
    vocab = quote.config["vocab_size"]
    dense = torch.arange(vocab, dtype=torch.float32) / 7
    quote.embed[3] = dense
    quote.embed[4] = torch.zeros(vocab).index_fill_(0, torch.arange(0, 100, 3), -2.5)
    text = emit(quote)
    assert 'embed 3 = f32"\n' in text
    assert "embed 4 = {\n    0: -2.5, 3: -2.5," in text and "\n}\n" in text
    rows = text.split('embed 3 = f32"\n')[1].split('"')[0].split("\n")
    assert all(len(row.strip()) == V.BASE64_PER_LINE for row in rows[:-1])
    back = parse(text)
    assert torch.equal(back.embed[3], dense) and back == quote


def test_tables_keep_every_bit(quote):
    vocab = quote.config["vocab_size"]
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, 3.4028235e38], dtype=torch.float32)
    quote.embed[5] = torch.cat([special, torch.zeros(vocab - len(special))])
    quote.embed[6] = torch.cat([special, torch.ones(vocab - len(special))])
    back = parse(emit(quote))
    for channel in (5, 6):
        assert torch.equal(back.embed[channel].view(torch.int32), quote.embed[channel].view(torch.int32))


def test_sparse_tables_may_be_written_by_hand_in_any_layout(quote):
    text = emit(quote).replace("embed 1 = {34: 1.0, 39: 1.0}", "embed 1 = {  # both quotes\n  39: 1,\n\n  34: 1.0,}")
    assert parse(text) == quote
    assert "embed 1 = {34: 1.0, 39: 1.0}  # both quotes\n" in format_text(text)


# ---------------------------------------------------------------- layout and comments

def test_layout_is_ignored_by_the_parser(quote):
    text = emit(quote)
    flat = "\n".join(line.strip() for line in text.splitlines()).replace("\n\n", "\n\n\n") + "\n"
    crlf = text.replace("\n", "\r\n")
    tabs = text.replace("  ", "\t")
    for variant in (flat, crlf, tabs, text.rstrip("\n")):
        assert parse(variant) == quote
        assert format_text(variant) == text


def test_comments_move_with_their_statements():
    text = QUOTE.read_text()
    moved = text.replace("    # The value carries the quote's kind ...\n", "") \
                .replace("    0.attn.v[0] bias=0.0\n", "    0.attn.v[0] bias=0.0  # carries the kind\n")
    formatted = format_text(moved)
    assert "    0.attn.v[0] bias=0.0  # carries the kind\n" in formatted
    assert format_text(formatted) == formatted


def test_comments_whose_statement_is_gone_are_kept_at_the_end():
    text = emit(parse(QUOTE.read_text())).replace("header:\n", "header:\n  # about a setting\n  x = {}\n")
    text = text.replace("  x = {}\n", "  x = {}\n  x.y = 1\n")
    formatted = format_text(text)
    assert "  x.y = 1\n" in formatted
    assert formatted.count("# about a setting") == 1


def test_user_comment_on_the_candidates_line_wins(quote):
    text = emit(quote).replace("candidates 34 39  # '\"' \"'\"", "candidates 34 39  # double, single")
    assert "candidates 34 39  # double, single\n" in format_text(text)


JUNK = st.text(alphabet="# \n\tabc=[]{}\"'0123456789.-:<fhlx", max_size=30)


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_damaged_text_fails_only_with_a_located_error(data):
    from circuitir.grammar import CirSyntaxError
    text = QUOTE.read_text()
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 40)))
    damaged = text[:start] + data.draw(JUNK) + text[end:]
    try:
        parse(damaged, "fuzz.cir")
    except CirSyntaxError as exc:
        report = str(exc).split("\n")
        assert report[0].startswith(f"fuzz.cir:{exc.line}:{exc.column}: ")
        assert report[1] == damaged.split("\n")[exc.line - 1].rstrip("\r")
        assert report[2].endswith("^") and len(report[2]) == exc.column


# ---------------------------------------------------------------- the EDGES fast path

def _records(text: str, lark) -> tuple[list, dict]:
    """What the parser's tree becomes (statements with positions) and the comments, read with ``lark``."""
    from circuitir.grammar import parser as P

    saved = P._LARK
    P._LARK = lark
    try:
        builder = P.Builder(text, "<test>")
        P._local.comments = tokens = []
        P._local.builder, P._local.depth = builder, 0
        records = P.ToStatements(builder.fail).transform(lark.parse(text))
        circuit = builder.build(records)
        comments = P._attach_comments(tokens, builder.anchors, text.split("\n"))
    finally:
        P._LARK = saved
        P._local.comments = P._local.builder = None
    return records, comments, circuit


def _lark_without_edges_token():
    """The grammar with the EDGES terminal taken out: every edge line read token by token."""
    from lark import Lark

    from circuitir.grammar import parser as P

    grammar = P.GRAMMAR_PATH.read_text()
    grammar = grammar.replace("_edge: edge | edges\n", "_edge: edge\n").replace("edges: EDGES\n", "")
    grammar = "\n".join(line for line in grammar.split("\n") if not line.startswith("EDGES.2:"))
    assert "EDGES" not in grammar
    options = P._lark().options
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=False,
                lexer_callbacks=options.lexer_callbacks)


def _commented(text: str, draw_comment) -> str:
    """``text`` with comments after some edge lines, on their own lines among them, and blank lines."""
    out = []
    for line in text.split("\n"):
        if line.lstrip().startswith("<-"):
            kind = draw_comment()
            line = {0: line, 1: line + "  # trailing", 2: line + "\n    # own line", 3: line + "\n\n",
                    4: line + "\t#t"}[kind]
        out.append(line)
    return "\n".join(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(circuit=circuits(), data=st.data())
def test_edges_token_reads_what_the_edge_rule_reads(circuit, data):
    """Edge lines read as one EDGES token give the same statements (positions included), the same
    comments and the same circuit as the same lines read token by token."""
    text = _commented(emit(circuit), lambda: data.draw(st.integers(0, 4)))
    from circuitir.grammar.parser import _lark

    fast_records, fast_comments, fast = _records(text, _lark())
    slow_records, slow_comments, slow = _records(text, _lark_without_edges_token())
    assert repr(fast_records) == repr(slow_records)  # repr: a header may hold nan, which is not == itself
    assert fast_comments == slow_comments
    assert emit(fast) == emit(slow)


def test_a_bad_edge_after_good_ones_is_located():
    """A run of good edge lines ends at the first bad one, which the edge rule reads and locates."""
    lines = (Path(__file__).parent.parent / "examples" / "bracket_toy.cir").read_text().split("\n")
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("<-"))
    bad = lines[at].split("#")[0].rstrip().rsplit(" ", 1)[0] + " 1.5x"
    lines.insert(at + 1, bad)
    with pytest.raises(CirSyntaxError) as info:
        parse("\n".join(lines), "f.cir")
    assert str(info.value).startswith(f"f.cir:{at + 2}:{len(bad)}: unexpected `x`")
