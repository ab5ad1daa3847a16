"""Every distinct failure the .cir fuzzer (tests/fuzz_cir.py) and issue 12 found, as a named case.

A file that parses runs: each damaged example below is either refused with one located
``file:line:col: message`` (the exact message is checked) before anything large is allocated, or
accepted and run. Nothing raises anything but :class:`CirSyntaxError` / :class:`UserError`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from circuitir.cli import main
from circuitir.grammar import CirSyntaxError, emit, format_text, parse
from circuitir.grammar import schema as S

from fuzz_cir import run_case

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BRACKET = (EXAMPLES / "bracket_toy.cir").read_text()
DIGIT = (EXAMPLES / "next_digit_toy.cir").read_text()


def edited(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), start=1) if fragment in line)


def refused(text: str, line: int, column: int, message: str, seconds: float = 2.0) -> CirSyntaxError:
    start = time.perf_counter()
    with pytest.raises(CirSyntaxError) as info:
        parse(text, "bad.cir")
    assert time.perf_counter() - start < seconds
    exc = info.value
    assert (exc.line, exc.column, exc.message) == (line, column, message), str(exc)
    report = str(exc).split("\n")
    assert report[0] == f"bad.cir:{line}:{column}: {message}"
    assert report[2] == " " * (column - 1) + "^"
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    assert run_case(text).kind == "rejected"
    return exc


# ---------------------------------------------------------------- the shipped examples

@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.cir")), ids=lambda p: p.name)
def test_every_shipped_example_parses_compiles_and_runs(path):
    assert run_case(path.read_text(), filename=str(path)).kind == "ran"


def test_a_tokenizer_described_in_words_reads_prompts_as_token_ids(capsys):
    # Was: AttributeError: 'str' object has no attribute 'get' (the header's tokenizer is a string).
    code = main(["run", str(EXAMPLES / "next_digit_toy.cir"), "1 2 3"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out == "'1 2 3'\n    '4': +6.6568  '5': -5.6568  ->  '4'\n"
    code = main(["run", str(EXAMPLES / "next_digit_toy.cir"), "x"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == ("circuitir run: error: prompt 'x': the vocabulary is described only in words ('tokens 0-9 "
                   "are the digits, 10-15 punctuation'), so a prompt is token ids separated by spaces (such as "
                   "'1 2 3'), not 'x'\n")
    code = main(["run", str(EXAMPLES / "next_digit_toy.cir"), "1 99"])
    out, err = capsys.readouterr()
    assert code == 2 and "outside the circuit's vocabulary of 16 tokens" in err and "Traceback" not in err


# ---------------------------------------------------------------- sizes, before allocating

@pytest.mark.parametrize("field, value, limit", [
    ("vocab_size", 300000000, S.MAX_VOCAB), ("vocab_size", 10 ** 11, S.MAX_VOCAB), ("n_layer", 100000, S.MAX_LAYERS),
    ("d_model", 1 << 20, S.MAX_WIDTH), ("d_mlp", 100000, S.MAX_WIDTH), ("block_size", 1 << 30, S.MAX_BLOCK_SIZE),
])
def test_absurd_sizes_are_refused_before_allocation(field, value, limit):
    old = next(line for line in BRACKET.split("\n") if line.startswith(f"  {field} = "))
    text = edited(BRACKET, old + "\n", f"  {field} = {value}\n")
    refused(text, line_of(text, f"  {field} = "), 3, f"config: {field} = {value} is beyond circuitir's limit of {limit}",
            seconds=1.0)


def test_attention_width_is_limited():
    text = edited(edited(BRACKET, "  n_head = 2\n", "  n_head = 4096\n"), "  d_head = 4\n", "  d_head = 4096\n")
    refused(text, line_of(text, "n_head ="), 3, "config: n_head x d_head = 16777216 is beyond circuitir's limit of 65536")


def test_many_tables_of_a_large_vocabulary_are_refused_before_allocation():
    # `embed c = {}` is 13 bytes of text and vocab_size float32 values of memory.
    tables = "".join(f"embed {i} = {{}}\n" for i in range(10, 87))  # 77 more than the example's 3
    text = edited(edited(BRACKET, "  vocab_size = 256\n", f"  vocab_size = {S.MAX_VOCAB}\n"),
                  "layer 0 attn:\n", tables + "layer 0 attn:\n")
    text = edited(text, "  d_model = 8\n", "  d_model = 100\n")
    refused(text, line_of(text, "embed 71 = "), 12,  # the 65th table: 64 fit in the limit
            f"80 tables of {S.MAX_VOCAB} values (vocab_size) hold 83,886,080 values together; circuitir's "
            f"limit is 67,108,864", seconds=1.0)


def test_deeply_nested_lists_are_refused_without_recursion():
    text = edited(BRACKET, "config:\n", "config:\n  deep = " + "[" * 5000 + "1" + "]" * 5000 + "\n")
    refused(text, line_of(text, "deep ="), 10 + S.MAX_NESTING, f"lists nested more than {S.MAX_NESTING} deep")


def test_nesting_up_to_the_limit_round_trips():
    value = "[" * S.MAX_NESTING + "1" + "]" * S.MAX_NESTING
    text = edited(BRACKET, "  source.model", f"  nested = {value}\n  source.model")
    circuit = parse(text)
    assert parse(emit(circuit)) == circuit


def test_an_integer_of_thousands_of_digits_is_refused():
    text = edited(BRACKET, "  block_size = 64\n", "  block_size = " + "9" * 5000 + "\n")
    refused(text, line_of(text, "block_size"), 16, "a number of 5000 characters; circuitir's limit is 100")
    text = edited(BRACKET, "candidates 93 10", "candidates 93 " + "1" * 400)
    refused(text, line_of(text, "candidates"), 15, "a number of 400 characters; circuitir's limit is 100")


def test_a_key_of_thousands_of_parts_is_refused():
    text = edited(BRACKET, "config:\n", "config:\n  " + ".".join(["k"] * 20000) + " = 1\n")
    refused(text, line_of(text, "k.k.k"), 3, "a key of 40001 characters; circuitir's limit is 4096")
    text = edited(BRACKET, "config:\n", "config:\n  " + ".".join(["k"] * 17) + " = 1\n")
    refused(text, line_of(text, "k.k.k"), 3, f"a key of 17 parts; circuitir's limit is {S.MAX_KEY_PARTS}")


def test_a_5000_line_header_parses_quickly():
    text = edited(BRACKET, "config:\n", "".join(f"  s{i} = {i}\n" for i in range(5000)) + "config:\n")
    start = time.process_time()
    assert run_case(text, with_format=False).kind == "ran"
    assert time.process_time() - start < 5


# ---------------------------------------------------------------- config and header types

@pytest.mark.parametrize("old, new, column, message", [
    ("  afrac = null", "  afrac = 1.5", 3, "config: afrac must be null or a number in (0, 1], got 1.5"),
    ("  afrac = null", "  afrac = nan", 3, "config: afrac must be null or a number in (0, 1], got nan"),
    ("  afrac = null", '  afrac = "x"', 3, "config: afrac must be null or a number in (0, 1], got 'x'"),
    ('  afrac_loctypes = "attn_in,attn_out,mlp_in,mlp_out"\n  tied', '  afrac_loctypes = 3\n  tied', 3,
     "config: afrac_loctypes must be a string, got 3"),
    ('  activation_type = "relu"', '  activation_type = "tanh"', 3,
     "config: activation_type must be one of 'gelu', 'relu', got 'tanh'"),
    ("  rms_norm = true", "  rms_norm = 1", 3, "config: rms_norm must be true or false, got 1"),
    ("  block_size = 64", "  block_size = nan", 3, "config: block_size must be a positive whole number, got nan"),
    ("  block_size = 64", "  block_size = 0", 3, "config: block_size must be a positive whole number, got 0"),
    ("  d_pos_emb = null", "  d_pos_emb = 3", 3, "config: d_pos_emb must be null or d_model (8), got 3"),
    ('  norm = "frozen"', '  norm = "other"', 3, 'header: norm must be "live" or "frozen", got \'other\''),
    ('  task = "bracket_counting"', "  task = 3", 3, "header: task must be a string or a group of settings "
                                                    "(task.x = ...), got a whole number"),
    ('  source.model = "none: written by hand to show the language"', "  source.tokenizer = 3", 3,
     'header: source.tokenizer must be a group of settings (source.tokenizer.kind = "bytes") or a string '
     "describing the vocabulary, got a whole number"),
    ('  source.model = "none: written by hand to show the language"', '  source.tokenizer.kind = "bpe"', 3,
     "header: source.tokenizer.kind must be one of 'bytes', 'tiktoken', 'data_gym', got 'bpe'"),
    ('  source.model = "none: written by hand to show the language"',
     '  source.tokenizer.kind = "data_gym"\n  source.tokenizer.dir = 3', 3,
     "header: source.tokenizer.dir (the directory that held vocab.bpe and encoder.json) must be a string, got 3"),
    ('  source.model = "none: written by hand to show the language"',
     '  source.tokenizer.kind = "data_gym"\n  source.tokenizer.sha256 = "abc"', 3,
     "header: source.tokenizer.sha256 must be 64 lowercase hex digits (the tokenizer files' SHA-256), got 'abc'"),
    ('  source.model = "none: written by hand to show the language"', '  source.tokenizer.kind = "tiktoken"', 3,
     "header: source.tokenizer.path (the .tiktoken file, a string) is needed for a tiktoken tokenizer"),
    ('  norm = "frozen"', '  norm = "frozen"\n  calibration.scale = "x"', 3,
     "header: calibration.scale must be a finite number, got 'x'"),
    ('  norm = "frozen"', '  norm = "frozen"\n  calibration.shift = nan', 3,
     "header: calibration.shift must be a finite number, got nan"),
    ('  norm = "frozen"', '  norm = "frozen"\n  calibration = 2', 3,
     "header: calibration must be a group of settings (calibration.x = ...), got a whole number"),
    ('  norm = "frozen"', '  norm = "frozen"\n  seed = "x"', 3, "header: seed must be a whole number, got 'x'"),
    ('  norm = "frozen"', '  norm = "frozen"\n  metrics.target_loss = -1', 3,
     "header: metrics.target_loss must be a finite number >= 0, got -1"),
])
def test_settings_of_the_wrong_type_or_range(old, new, column, message):
    text = edited(BRACKET, old, new)
    changed = [line for line in new.split("\n") if line not in old][-1]
    refused(text, line_of(text, changed), column, message)


def test_a_config_without_what_run_needs():
    text = edited(BRACKET, '  activation_type = "relu"\n', "")
    refused(text, line_of(text, "config:"), 1, "config: activation_type is missing (compile and run need it)")
    assert format_text(text) == text  # formatting does not need it


# ---------------------------------------------------------------- structure that compile reads

def test_a_missing_final_norm():
    text = edited(BRACKET, "  norm final rms eps=1.1920929e-07 width=8 frozen=1.0\n", "")
    refused(text, line_of(text, "final:"), 1, "the final norm is missing (`norm final rms eps=... width=...` in "
                                              "the `final:` block): the logits read final_resid through it")
    assert format_text(text) == text


def test_a_kept_read_without_its_norm():
    text = edited(BRACKET, "  norm 0.mlp rms eps=1.1920929e-07 width=8 frozen=1.0\n", "")
    refused(text, line_of(text, "0.mlp.act_in[3] gain"), 3,
            "0.mlp.act_in[3] reads the residual stream through norm 0.mlp, which the circuit does not declare "
            "(`norm 0.mlp ...`)")


def test_an_edge_the_model_does_not_have():
    text = edited(BRACKET, "    <- 0.mlp.act_in[3] 40.0\n", "    <- 0.mlp.act_in[3] 40.0\n    <- 0.attn.v[4] 2.0\n")
    refused(text, line_of(text, "<- 0.attn.v[4] 2.0"), 8,
            "edge 0.attn.v[4] -> 0.mlp.post_act[5]: the model has no weight from 0.attn.v to 0.mlp.post_act "
            "(weights: act_in -> q/k/v and v -> resid_delta in attention, act_in -> post_act -> resid_delta in "
            "the MLP, final_resid -> logits)")


def test_no_candidates():
    text = edited(BRACKET, "candidates 93 10  # ']' '\\n'", "candidates")
    refused(text, line_of(text, "candidates"), 1, "no candidates: the circuit computes the logits of at least one "
                                                  "token")


def test_a_top_k_site_with_fewer_live_channels_than_k():
    text = edited(edited(BRACKET, "  afrac = null", "  afrac = 0.25"),
                  '  afrac_loctypes = "attn_in,attn_out,mlp_in,mlp_out"', '  afrac_loctypes = "mlp_neuron"')
    # 0.mlp.post_act has 16 channels: AbsTopK keeps 4, the circuit has 1.
    refused(text, line_of(text, "0.mlp.post_act[5] bias"), 3,
            "0.mlp.post_act keeps its 4 largest channels (afrac 0.25, location mlp_neuron), but the circuit has "
            "only 1 of them (kept or const): a top-k site needs none or at least 4")
    consts = "".join(f"  const 0.mlp.post_act[{c}] = 0.0\n" for c in (0, 1, 2))
    text = edited(text, "  0.mlp.post_act[5] bias", consts + "  0.mlp.post_act[5] bias")
    assert run_case(text).kind == "ran"


def test_a_file_with_carriage_returns_only_gets_a_caret_under_its_column():
    # Was: the caret stopped short of the column when the line ended in "\r".
    text = BRACKET.replace("\n", "\r")
    with pytest.raises(CirSyntaxError) as info:
        parse(text, "bad.cir")
    report = str(info.value).split("\n")
    assert report[0].startswith("bad.cir:1:") and "unexpected" in info.value.message
    assert len(report[2]) == info.value.column and report[2].endswith("^")
    assert run_case(text).kind == "rejected"


def test_emit_refuses_settings_deeper_than_the_parser_reads_without_recursion():
    from circuitir.ir.circuit import CircuitError

    circuit = parse(BRACKET)
    deep = value = []
    for _ in range(10000):
        value.append([])
        value = value[0]
    circuit.header["deep"] = deep
    with pytest.raises(CircuitError, match=r"header deep: lists nested more than 16 deep cannot be written"):
        emit(circuit)
    circuit = parse(BRACKET)
    group = circuit.header
    for _ in range(10000):
        group["k"] = {}
        group = group["k"]
    group["k"] = 1
    with pytest.raises(CircuitError, match=r"header: k\.k\.k\.\.\.: settings nested more than 16 deep cannot be written"):
        emit(circuit)


def test_a_norm_width_other_than_d_model():
    # Was: NaN logits from a LayerNorm of width 2 over 8 channels (negative variance; found by the fuzzer).
    digit = (EXAMPLES / "next_digit_toy.cir").read_text()
    text = edited(digit, "norm 0.mlp layernorm eps=1e-05 width=8", "norm 0.mlp layernorm eps=1e-05 width=2")
    refused(text, line_of(text, "width=2"), 40, "norm 0.mlp: width=2, but a norm normalises the 8 channels of the "
                                               "residual stream (d_model)")
    assert format_text(text) == text


def test_a_norm_width_beyond_what_the_runtime_can_divide_by():
    # Was: OverflowError: int too big to convert, in the compiled forward (found by the fuzzer).
    text = BRACKET.replace("width=8 frozen=1.0\n  0.mlp", "width=" + "9" * 50 + " frozen=1.0\n  0.mlp")
    refused(text, line_of(text, "9" * 50), 42, f"width {'9' * 50} is beyond circuitir's limit of {1 << 40} (2^40)")
    assert run_case(BRACKET.replace("width=8", f"width={1 << 40}")).kind == "rejected"  # not d_model


def test_a_circuit_too_large_to_check_is_refused_before_its_graph_is_built():
    # 3000 outputs over a circuit of 3000 nodes would be searched 3000 times: 9 M steps.
    n = 3000
    text = edited(BRACKET, "candidates 93 10  # ']' '\\n'", "candidates " + " ".join(["93"] * n))
    text = edited(text, "  logits[1] bias=1.0\n", "".join(f"  logits[{k}] bias=1.0\n" for k in range(1, n)))
    exc = refused(text, line_of(text, "candidates"), 1,
                  f"the circuit is too large to check: 2 residual writes x 3 reads + {n} outputs x {n + 15} nodes "
                  f"and 5 edges = 9,060,006; circuitir's limit is 8,388,608", seconds=5)
    assert exc.message.startswith("the circuit is too large to check")


# ---------------------------------------------------------------- sparse tables read as one token

HAND_TABLE = ("embed 0 = {  # the brackets\n"
              "    91: 1.0,   # open\n"
              "\n"
              "    # a comment line, with 3: 4.0 in it\n"
              "    93: -1.0 ,\n"
              "}\n")


def test_a_sparse_table_read_whole_means_what_it_says_and_keeps_its_comments():
    text = edited(BRACKET, "embed 0 = {91: 1.0, 93: -1.0}\n", HAND_TABLE)
    assert parse(text) == parse(BRACKET)
    formatted = format_text(text)
    for comment in ("# the brackets", "# open", "# a comment line, with 3: 4.0 in it"):
        assert comment in formatted
    assert format_text(formatted) == formatted


def test_an_error_inside_a_sparse_table_points_at_the_entry():
    text = edited(BRACKET, "embed 0 = {91: 1.0, 93: -1.0}\n", HAND_TABLE.replace("93: -1.0", "93: -1.0x"))
    exc = refused(text, line_of(text, "93: -1.0x"), 13, "unexpected `x`")
    assert "expected" in str(exc)
    text = edited(BRACKET, "embed 0 = {91: 1.0, 93: -1.0}\n", HAND_TABLE.replace("93: -1.0", "300: -1.0"))
    refused(text, line_of(text, "300: -1.0"), 5, "table index 300 does not fit: the table has 256 entries (vocab_size)")
    text = edited(BRACKET, "embed 0 = {91: 1.0, 93: -1.0}\n", HAND_TABLE.replace("91: 1.0", "91: 1e39"))
    refused(text, line_of(text, "91: 1e39"), 9, "1e39 is out of the float32 range (largest 3.4028235e+38)")
    text = edited(BRACKET, "embed 0 = {91: 1.0, 93: -1.0}\n", HAND_TABLE.replace("91: 1.0", "91: 1." + "0" * 200))
    refused(text, line_of(text, "91: 1.000"), 9, "a number of 202 characters; circuitir's limit is 100")


@pytest.mark.parametrize("filler", [" " * 50000, "\n" * 50000, "1: 1.0, " * 20000 + " " * 20000])
def test_a_long_malformed_table_fails_in_linear_time(filler):
    text = edited(BRACKET, "embed 0 = {91: 1.0, 93: -1.0}\n", "embed 0 = {" + filler + "oops}\n")
    start = time.process_time()
    with pytest.raises(CirSyntaxError):
        parse(text)
    assert time.process_time() - start < 3


def test_a_checkable_circuit_names_its_task_and_ablation_as_groups():
    # check reads task.name and ablation.kind once source.sha256 matches: a string there was an AttributeError.
    text = edited(BRACKET, '  source.model = "none: written by hand to show the language"',
                  '  source.sha256 = "' + "ab" * 32 + '"')
    refused(text, line_of(text, "  task = "), 3, 'header: task must be a group of settings (task.name = ...) in a '
                                                 'circuit that names its source model (source.sha256), got a string')
    text = edited(text, '  task = "bracket_counting"', '  task.name = "bracket_counting"')
    refused(text, line_of(text, "  ablation = "), 3, 'header: ablation must be a group of settings (ablation.kind '
                                                     '= ...) in a circuit that names its source model '
                                                     '(source.sha256), got a string')
    assert run_case(edited(text, '  ablation = "zero"', '  ablation.kind = "zero"')).kind == "ran"
