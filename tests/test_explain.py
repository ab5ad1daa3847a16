"""Labels in the .cir language, and `circuitir explain` on the shipped circuits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from circuitir.cli import main
from circuitir.explain import NodeExplanation, annotate
from circuitir.grammar import CirSyntaxError, emit, format_text, parse
from circuitir.ir.circuit import Label, Node
from circuitir.runtime.compile import compile_circuit

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODEL = ROOT / "models" / "sparse.pt"


@pytest.fixture(scope="module")
def brackets():
    return parse((EXAMPLES / "sparse-brackets.cir").read_text(), "sparse-brackets.cir")


def labelled(circuit):
    kept = circuit.kept_nodes()
    circuit.labels[kept[0]] = Label('open "bracket" \\ detector\n', "hand")
    circuit.labels[kept[3]] = Label("on [ ( | ans ]>\\n", "auto")
    circuit.labels[Node("logits", 1)] = Label("logit ]", "hand")
    return circuit


def test_labels_round_trip_exactly_and_fmt_shows_them(brackets):
    circuit = labelled(parse(emit(brackets)))
    text = emit(circuit)
    assert 'label "open \\"bracket\\" \\\\ detector\\n"' in text
    assert 'label auto "on [ ( | ans ]>\\\\n"' in text
    again = parse(text)
    assert again == circuit and again.labels == circuit.labels
    assert emit(again) == text
    assert format_text(text) == text
    # the label stands on the line right after its node
    lines = text.splitlines()
    at = lines.index(f"  {circuit.kept_nodes()[0]} gain=0.8040404")  # the shipped circuit's first node
    assert lines[at + 1].strip().startswith("label ")
    # labels take part in equality: the unlabelled circuit differs
    assert again != brackets


def test_compile_ignores_labels(brackets):
    circuit = labelled(parse(emit(brackets)))
    tokens = torch.tensor([list(b"x = [[1, 2]"), list(b"y = [3, 4]]")])
    with torch.no_grad():
        assert torch.equal(compile_circuit(circuit)(tokens), compile_circuit(brackets)(tokens))


def test_label_syntax_errors_point_at_the_label():
    circuit = labelled(parse((EXAMPLES / "sparse-brackets.cir").read_text()))
    text = emit(circuit)
    with pytest.raises(CirSyntaxError) as bad_source:
        parse(text.replace("label auto", "label manual"), "x.cir")
    assert "unexpected `manual`" in str(bad_source.value) and "`auto`" in str(bad_source.value)
    with pytest.raises(CirSyntaxError) as bad_escape:
        parse(text.replace('label "logit ]"', 'label "a\\q"'), "x.cir")
    assert "bad string" in str(bad_escape.value)


def test_hand_written_labels_win_and_survive_reannotation(brackets):
    circuit = labelled(parse(emit(brackets)))
    hand_node, auto_node = circuit.kept_nodes()[0], circuit.kept_nodes()[3]
    explanations = {n: NodeExplanation(str(n), "x", f"generated {n}") for n in circuit.kept_nodes()}
    written = annotate(circuit, explanations)
    assert written == len(explanations) - 1
    assert circuit.labels[hand_node] == Label('open "bracket" \\ detector\n', "hand")
    assert circuit.labels[auto_node] == Label(f"generated {auto_node}", "auto")
    explanations = {n: NodeExplanation(str(n), "x", f"second {n}") for n in circuit.kept_nodes()}
    annotate(circuit, explanations)
    assert circuit.labels[auto_node].text == f"second {auto_node}"
    assert circuit.labels[hand_node].source == "hand"


@pytest.mark.parametrize("name, task_tokens", [("sparse-brackets.cir", ("]", "\\n")),
                                               ("sparse-quotes.cir", ("'", '"'))])
def test_explain_labels_every_node_of_the_shipped_circuits(tmp_path, capsys, name, task_tokens):
    path = tmp_path / name
    shutil.copy(EXAMPLES / name, path)
    original = parse(path.read_text())
    # a hand-written label that explain must keep
    text = path.read_text()
    first = original.kept_nodes()[0]
    line = next(l for l in text.splitlines() if l.strip().startswith(str(first) + " "))
    text = text.replace(line + "\n", line + "\n    label \"my words\"\n", 1)
    path.write_text(text)
    assert main(["explain", str(path), "--model", str(MODEL), "-i", "--json", "--windows", "128",
                 "--prompts", "128"]) == 0
    report = json.loads(capsys.readouterr().out)
    circuit = parse(path.read_text())
    assert set(circuit.labels) == {n for n, d in circuit.nodes.items() if d.kind in ("kept", "output")}
    assert circuit.labels[first] == Label("my words", "hand")
    assert all(circuit.labels[n].source == "auto" and circuit.labels[n].text for n in circuit.kept_nodes()[1:])
    # the labels change nothing the circuit computes
    assert emit(dataclasses.replace(circuit, labels={})) == emit(original)
    rows = {row["node"]: row for row in report["nodes"]}
    assert len(rows) == circuit.n_nodes + len(circuit.candidates)
    row = rows[str(circuit.kept_nodes()[-1])]
    assert row["corpus_contexts"] and row["task_contexts"]
    assert set(row["class_means"]) == set(task_tokens)
    residual = [r for r in rows.values() if r["kind"] in ("act_in", "resid_delta", "final_resid")]
    assert residual and all(r["embed_tokens"] for r in residual)
    # the strongest context's activation is the node's largest (or most negative) value
    best = row["corpus_contexts"][0]["activation"]
    assert all(row["sign"] * c["activation"] <= row["sign"] * best + 1e-6 for c in row["corpus_contexts"])


def test_explain_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["explain", str(EXAMPLES / "sparse-brackets.cir"), "--model", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such checkpoint" in err
    # a circuit of another model shape
    assert main(["explain", str(EXAMPLES / "bracket_toy.cir"), "--model", str(MODEL)]) == 2
    assert "does not match the model" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), source=st.sampled_from(["hand", "auto"]), pick=st.integers(0, 10 ** 6))
def test_any_label_text_round_trips(text, source, pick):
    circuit = parse((EXAMPLES / "bracket_toy.cir").read_text())
    nodes = circuit.kept_nodes() + [Node("logits", k) for k in range(len(circuit.candidates))]
    circuit.labels[nodes[pick % len(nodes)]] = Label(text, source)
    emitted = emit(circuit)
    assert emitted.isascii()
    again = parse(emitted)
    assert again == circuit and again.labels == circuit.labels and emit(again) == emitted
