"""render: DOT text of a circuit, and drawing through Graphviz when it is installed."""

import shutil
from pathlib import Path

import pytest

from circuitir.cli import main
from circuitir.grammar import parse
from circuitir.render.graphviz import to_dot

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bracket_toy.cir"


def test_dot_has_every_kept_node_and_weight_edge():
    circuit = parse(EXAMPLE.read_text(), str(EXAMPLE))
    dot = to_dot(circuit, "t")
    for node in circuit.kept_nodes():
        assert f'"{node}"' in dot
    weight_edges = [(s, d) for (s, d) in circuit.edges if circuit.nodes[s].kind == "kept"]
    for src, dst in weight_edges:
        assert f'"{src}" -> "{dst}"' in dot
    # Constants are not drawn.
    for node in circuit.const_nodes():
        assert f'"{node}" [' not in dot
    assert dot.count("->") >= len(weight_edges)


def test_render_dot_file_and_bad_suffix(tmp_path, capsys):
    out = tmp_path / "c.dot"
    assert main(["render", str(EXAMPLE), "-o", str(out)]) == 0
    assert out.read_text().startswith("digraph circuit {")
    bad = tmp_path / "c.bmp"
    assert main(["render", str(EXAMPLE), "-o", str(bad)]) == 2
    assert "cannot render to .bmp" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_render_png(tmp_path):
    out = tmp_path / "c.png"
    assert main(["render", str(EXAMPLE), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
