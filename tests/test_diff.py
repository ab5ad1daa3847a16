"""circuitir diff: structural (nodes, edges, weights beyond a tolerance, header) and behavioural.

The circuits are the hand-written examples/quote_toy.cir and copies of it changed in known ways, so
every line of the expected diff can be written down here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from circuitir.grammar import emit, parse
from circuitir.ir.circuit import Node
from circuitir.models.checkpoint import save_checkpoint
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.runtime.diff import format_diff, structural_diff
from circuitir.runtime.evaluate import circuit_task_metrics
from circuitir.tasks import get_task

from conftest import cli, randomize_, tiny_config

QUOTE_TOY = Path(__file__).parent.parent / "examples" / "quote_toy.cir"
N = lambda text: Node(text.split("[")[0], int(text.split("[")[1][:-1]))  # noqa: E731


@pytest.fixture
def toy():
    return parse(QUOTE_TOY.read_text(), str(QUOTE_TOY))


@pytest.fixture
def write(tmp_path):
    def save(circuit, name):
        path = tmp_path / name
        path.write_text(emit(circuit))
        return path
    return save


def modified(toy):
    """One edge weight changed, one node removed (with its one edge), one edge added, one header value changed."""
    other = copy.deepcopy(toy)
    other.edges[(N("final_resid[2]"), N("logits[0]"))] = 3.5                 # was 3.0
    del other.nodes[N("0.attn.act_in[1]")]
    del other.edges[(N("0.attn.act_in[1]"), N("0.attn.k[0]"))]               # weight 2.0
    other.edges[(N("0.attn.act_in[0]"), N("0.attn.k[0]"))] = 0.75
    other.header["source"]["model"] = "edited by hand"
    other.verify()
    return other


def test_a_circuit_equals_itself(toy, write):
    a, b = write(toy, "a.cir"), write(copy.deepcopy(toy), "b.cir")
    code, out, err = cli("diff", a, b)
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"--- {a}", f"+++ {b}", "circuits are equal"]
    code, out, _ = cli("diff", a, QUOTE_TOY, "--json")  # comments and layout do not count
    assert code == 0 and json.loads(out)["equal"] is True and json.loads(out)["structural"]["equal"] is True


def test_the_diff_reports_exactly_the_changes(toy, write):
    a, b = write(toy, "a.cir"), write(modified(toy), "b.cir")
    code, out, err = cli("diff", a, b)
    assert code == 1 and err == ""
    assert out.splitlines() == [
        f"--- {a}", f"+++ {b}",
        "header:",
        "  ~ source.model: 'none: written by hand to show the language' -> 'edited by hand'",
        "nodes:",
        "  - 0.attn.act_in[1]",
        "edges:",
        "  + 0.attn.act_in[0] -> 0.attn.k[0]  0.75",
        "  - 0.attn.act_in[1] -> 0.attn.k[0]  2.0",
        "  ~ final_resid[2] -> logits[0]: 3.0 -> 3.5",
        "summary: nodes +0 -1 ~0, edges +1 -1 ~1, header changes 1, tables changed 0",
    ]
    # The other way round, additions and removals swap.
    code, out, _ = cli("diff", b, a)
    assert code == 1
    assert "  + 0.attn.act_in[1]" in out and "  - 0.attn.act_in[0] -> 0.attn.k[0]  0.75" in out
    assert "  ~ final_resid[2] -> logits[0]: 3.5 -> 3.0" in out


def test_the_json_diff(toy, write):
    code, out, _ = cli("diff", write(toy, "a.cir"), write(modified(toy), "b.cir"), "--json")
    assert code == 1
    result = json.loads(out)
    assert set(result) == {"structural", "behavioural", "equal"}
    assert result["equal"] is False and result["behavioural"] is None
    assert result["structural"] == {
        "equal": False,
        "header": [{"key": "source.model", "a": "none: written by hand to show the language", "b": "edited by hand"}],
        "config": [],
        "candidates": None,
        "nodes": {"added": [], "removed": ["0.attn.act_in[1]"], "changed": []},
        "edges": {"added": [{"src": "0.attn.act_in[0]", "dst": "0.attn.k[0]", "weight": 0.75}],
                  "removed": [{"src": "0.attn.act_in[1]", "dst": "0.attn.k[0]", "weight": 2.0}],
                  "changed": [{"src": "final_resid[2]", "dst": "logits[0]", "a": 3.0, "b": 3.5}]},
        "heads": {"added": [], "removed": []},
        "tables": [],
    }


def test_node_head_and_table_changes(toy):
    other = copy.deepcopy(toy)
    other.nodes[N("0.attn.k[0]")].bias = 0.5
    other.nodes[N("0.attn.q[0]")].value = 4.5
    other.heads[(0, 0)] = -1.0  # a sink logit where there was none
    other.embed[0] = other.embed[0].clone()
    other.embed[0][34] = 2.0
    diff = structural_diff(toy, other)
    assert diff.nodes_changed == [("0.attn.q[0]", "value", 4.0, 4.5), ("0.attn.k[0]", "bias", 0.0, 0.5),
                                  ("0.attn.head[0]", "sink", None, -1.0)]
    assert diff.tables_changed == [("embed 0", 1.0)]
    text = format_diff(diff, "a", "b")
    assert "  ~ 0.attn.k[0] bias: 0.0 -> 0.5" in text and "  ~ 0.attn.head[0] sink: None -> -1.0" in text
    assert "  ~ embed 0: max |difference| 1" in text
    assert not (diff.nodes_added or diff.nodes_removed or diff.edges_added or diff.edges_removed
                or diff.edges_changed or diff.header)


def test_tolerance_is_relative_and_respected(toy, write):
    a = write(toy, "a.cir")
    tiny, small = copy.deepcopy(toy), copy.deepcopy(toy)
    edge = (N("final_resid[2]"), N("logits[0]"))
    tiny.edges[edge] = float(torch.nextafter(torch.tensor(3.0), torch.tensor(4.0)))  # 3 + 2.4e-7: 8e-8 relative
    small.edges[edge] = float(torch.tensor(3.003, dtype=torch.float32))  # 1e-3 relative
    tiny_path, small_path = write(tiny, "tiny.cir"), write(small, "small.cir")
    assert cli("diff", a, tiny_path)[0] == 0                          # within the default 1e-6
    code, out, _ = cli("diff", a, tiny_path, "--tolerance", 0)
    assert code == 1 and "~ final_resid[2] -> logits[0]: 3.0 -> 3.0000002" in out  # spelt as in the file
    code, out, _ = cli("diff", a, small_path)
    assert code == 1 and "edges +0 -0 ~1" in out
    assert cli("diff", a, small_path, "--tolerance", 2e-3)[0] == 0     # 0.003 <= 2e-3 * 3.003
    assert cli("diff", a, small_path, "--tolerance", 9e-4)[0] == 1
    # The tolerance scales with the weight, and is absolute below 1.
    assert structural_diff(toy, small, tolerance=1e-3).equal


def test_ignore_header(toy, write):
    other = copy.deepcopy(toy)
    other.header["task"] = "bracket_counting"
    other.header["pipeline"] = "trace, zero-ablate, prune, lower, dce"  # a key a lacks
    a, b = write(toy, "a.cir"), write(other, "b.cir")
    code, out, _ = cli("diff", a, b)
    assert code == 1
    assert "  ~ task: 'single_double_quote' -> 'bracket_counting'" in out
    assert "  + pipeline = 'trace, zero-ablate, prune, lower, dce'" in out
    assert cli("diff", a, b, "--ignore-header")[0] == 0


# ---------------------------------------------------------------- behavioural

@pytest.fixture
def model_file(tmp_path):
    """Any byte-level checkpoint: a behavioural diff needs only its tokenizer."""
    path = tmp_path / "model.pt"
    save_checkpoint(path, randomize_(SparseGPT(tiny_config(block_size=64)), seed=0), ByteTokenizer())
    return path


def test_behavioural_diff_counts_the_predictions_that_differ(toy, write, model_file):
    """quote_toy closes every string with the quote that opened it; with its logit weights swapped it
    picks the other quote every time, so all predictions differ."""
    flipped = copy.deepcopy(toy)
    flipped.edges[(N("final_resid[2]"), N("logits[0]"))] = -3.0
    flipped.edges[(N("final_resid[2]"), N("logits[1]"))] = 3.0
    a, b = write(toy, "a.cir"), write(flipped, "b.cir")
    code, out, err = cli("diff", a, b, "--model", model_file, "--task", "quotes", "-n", 64, "--json")
    assert code == 1, err
    behaviour = json.loads(out)["behavioural"]
    task = get_task("single_double_quote")
    mine_a = circuit_task_metrics(toy, task, ByteTokenizer(), n=64)
    mine_b = circuit_task_metrics(flipped, task, ByteTokenizer(), n=64)
    assert behaviour["task"] == "single_double_quote" and behaviour["n"] == 64
    assert behaviour["a"] == {"loss": mine_a["loss"], "accuracy": 1.0}
    assert behaviour["b"] == {"loss": mine_b["loss"], "accuracy": 0.0}
    assert behaviour["b"]["loss"] > 1.0 > 0.1 > behaviour["a"]["loss"]
    assert behaviour["predictions_differ"] == 64
    assert len(behaviour["examples"]) == 5
    assert all(row["a_correct"] and not row["b_correct"] for row in behaviour["examples"])
    assert behaviour["max_abs_logit_diff"] > 1.0
    code, out, _ = cli("diff", a, b, "--model", model_file, "--task", "quotes", "-n", 64)
    assert code == 1 and "64 predictions differ" in out and "accuracy 1.000 -> 0.000" in out


def test_behavioural_diff_of_equal_behaviour(toy, write, model_file):
    """A changed header and a weight changed within what moves no prediction: structure differs
    (exit 1), behaviour does not; with --ignore-header and no structural change, exit 0."""
    other = copy.deepcopy(toy)
    other.edges[(N("final_resid[2]"), N("logits[0]"))] = 3.25
    a, b = write(toy, "a.cir"), write(other, "b.cir")
    code, out, _ = cli("diff", a, b, "--model", model_file, "--task", "quotes", "-n", 32, "--json")
    result = json.loads(out)
    assert code == 1 and result["behavioural"]["predictions_differ"] == 0
    assert result["behavioural"]["a"]["accuracy"] == result["behavioural"]["b"]["accuracy"] == 1.0
    assert 0 < result["behavioural"]["max_abs_logit_diff"] <= 0.25
    code, out, _ = cli("diff", a, write(copy.deepcopy(toy), "c.cir"), "--model", model_file, "--task", "quotes",
                       "-n", 32, "--json")
    assert code == 0 and json.loads(out)["equal"] is True


def test_behavioural_diff_needs_model_and_task(toy, write, model_file):
    a = write(toy, "a.cir")
    for extra in (["--model", model_file], ["--task", "quotes"]):
        code, out, err = cli("diff", a, a, *extra)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert "a behavioural diff needs both --model and --task" in err
    code, _, err = cli("diff", a, a, "--model", model_file, "--task", "bracket_brace")
    assert code == 2 and "the circuit has no output for token" in err and "another task" in err
