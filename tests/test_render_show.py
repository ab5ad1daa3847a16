"""`circuitir show`: each shipped circuit on one screen, every head and neuron with its label."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from circuitir.cli import main
from circuitir.grammar import emit, parse
from circuitir.ir.circuit import Label
from circuitir.render.show import show
from circuitir.render.structure import blocks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHIPPED = ["sparse-brackets.cir", "sparse-quotes.cir"]


def labelled(name):
    circuit = parse((EXAMPLES / name).read_text())
    for node in circuit.kept_nodes():
        circuit.labels[node] = Label(f"L{node.index}x{len(node.site)}", "auto")
    return circuit


@pytest.mark.parametrize("name", SHIPPED)
def test_show_fits_one_screen_and_names_every_head_and_neuron(name):
    circuit = labelled(name)
    text = show(circuit)
    lines = text.splitlines()
    assert len(lines) <= 60 and max(len(line) for line in lines) <= 100
    assert lines[0].startswith(f"{circuit.header['task']['name']}: {circuit.n_nodes} nodes, {circuit.n_edges} edges")
    for block in blocks(circuit):
        at = next(i for i, line in enumerate(lines) if line.startswith(block.title + ":"))
        for head in block.heads:
            line = next(l for l in lines[at:] if l.startswith(f"  head {head.index} "))
            for part in ("q", "k", "v"):
                if head.channels[part]:
                    assert f"{part} {' '.join(str(n.index) for n in head.channels[part])}" in line
        # nothing is cut off: every channel read and written is listed (lines fold, they are not clipped)
        end = next((i for i, line in enumerate(lines[at + 1:], at + 1) if not line.startswith(" ")), len(lines))
        listed = " ".join(lines[at:end])
        for node in block.reads + block.writes:
            assert re.search(rf"\b{node.index}\b", listed), node
        assert ".." not in listed
        for neuron in block.neurons:
            label = circuit.labels[neuron].text
            assert re.search(rf"\b{neuron.index}\s+\(\d+/\d+\) {label}\b", text), (neuron, label)
    # embedding columns as token sets: the strongest token of each column, with its sign
    column = circuit.embed[2]
    top = int(column.abs().argmax())
    token = bytes([top]).decode("latin-1").encode("unicode_escape").decode()
    assert re.search(rf"(^|\s)2: {'-' if column[top] < 0 else ''}{re.escape(token)}( |$)", text, re.M)


def test_show_command_and_bad_input(tmp_path, capsys):
    path = tmp_path / "b.cir"
    path.write_text(emit(labelled("sparse-brackets.cir")))
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer 0 attn:" in out and "logit `]`" in out and "logit `\\n`" in out
    assert main(["show", str(tmp_path / "missing.cir")]) == 2
    assert "cannot read" in capsys.readouterr().err
    path.write_text("circuitir 1\nconfig:\n  oops\n")
    assert main(["show", str(path)]) == 2
