"""Figures: SVG, PDF, PNG, DOT and TikZ, full and collapsed; content checked, TikZ built with pdflatex."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from circuitir.cli import main
from circuitir.grammar import emit, parse
from circuitir.ir.circuit import Label
from circuitir.render.graphviz import NEGATIVE, POSITIVE, collapsed_drawing, render_bytes, to_dot
from circuitir.render.structure import blocks
from circuitir.render.tikz import tex, tikz_name

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
needs_tex = pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("pdftotext") is None,
                               reason="pdflatex / pdftotext (texlive-latex-base, poppler-utils) not installed")


@pytest.fixture(scope="module")
def circuit():
    circuit = parse((EXAMPLES / "sparse-brackets.cir").read_text())
    for node in circuit.kept_nodes():
        circuit.labels[node] = Label(f"lbl{node.index} | ans ]>\\n", "auto")
    circuit.labels[circuit.kept_nodes()[0]] = Label("open-bracket reader", "hand")
    return circuit


def svg_titles(svg: str) -> set[str]:
    return {html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", svg)}


@needs_dot
def test_svg_has_every_kept_node_label_edge_colour_and_legend(circuit):
    svg = render_bytes(circuit, "svg").decode()
    titles = svg_titles(svg)
    for node in circuit.kept_nodes():
        assert str(node) in titles
    text = html.unescape(" ".join(re.findall(r"<text[^>]*>(.*?)</text>", svg)))
    assert "open-bracket reader" in text and "lbl214" in text and "weight &lt; 0" not in text
    assert "weight < 0" in text and "residual" in text and "attention" in text
    # an edge's colour is its weight's sign
    strokes = {}
    for chunk in svg.split('<g id="edge')[1:]:
        title = html.unescape(re.search(r"<title>(.*?)</title>", chunk)[1])
        strokes[title] = re.search(r'<path[^>]*stroke="([^"]+)"', chunk)[1]
    kept_edges = [(s, d, w) for (s, d), w in circuit.edges.items() if circuit.nodes[s].kind == "kept"]
    assert {w > 0 for _, _, w in kept_edges} == {True, False}
    for source, target, weight in kept_edges:
        assert strokes[f"{source}->{target}"] == (POSITIVE if weight > 0 else NEGATIVE)
    # bands stack: every layer-0 node lies below (larger y in SVG) every layer-1 node
    def y_of(node):
        block = re.search(re.escape(f"<title>{html.escape(str(node))}</title>") + r".*?<text[^>]*y=\"([-\d.]+)\"",
                          svg.replace("&#45;", "-").replace("&gt;", ">"), re.S)
        return float(block[1])
    low = [n for n in circuit.kept_nodes() if n.site.startswith("0.")]
    high = [n for n in circuit.kept_nodes() if n.site.startswith("1.")]
    assert min(y_of(n) for n in low) > max(y_of(n) for n in high)


@needs_dot
def test_collapsed_has_one_box_per_head_and_label_group(circuit):
    drawing = collapsed_drawing(circuit, "t")
    ids = drawing.box_ids()
    heads = [h for b in blocks(circuit) for h in b.heads]
    neuron_labels = {(b.layer, circuit.labels[n].text) for b in blocks(circuit) for n in b.neurons}
    assert len(ids) == 1 + len(heads) + len(neuron_labels) + len(circuit.candidates)
    assert len(ids) < circuit.n_nodes / 4
    svg = render_bytes(circuit, "svg", collapse=True).decode()
    titles = svg_titles(svg)
    assert set(ids) <= titles
    assert all(f"{h.layer}.head{h.index}" in titles for h in heads)
    assert all(not re.match(r"^\d+\.(attn|mlp)\.\w+\[\d+\]$", t) for t in titles)  # no single channels
    weights = [a for a in drawing.arrows if a.kind == "weight"]
    assert weights and any(a.source == "embed" for a in weights) and any(a.target.startswith("logits") for a in weights)


@needs_dot
@pytest.mark.parametrize("collapse", [False, True])
def test_tikz_has_every_node(circuit, collapse):
    picture = render_bytes(circuit, "tikz", collapse=collapse).decode()
    assert picture.count("\\begin{tikzpicture}") == 1 and "\\end{tikzpicture}" in picture
    ids = collapsed_drawing(circuit, "t").box_ids() if collapse else [str(n) for n in circuit.kept_nodes()]
    for box in ids:
        assert f"({tikz_name(box)}) at (" in picture, box
    assert tex("open-bracket reader") in picture or collapse
    assert "weight $<$ 0" not in picture and "weight \\textless{} 0" in picture


def test_tex_escapes_every_special_character():
    assert tex("a_b\\c{d}$%#&~^|<>'\"`-") == ("a\\_b\\textbackslash{}c\\{d\\}\\$\\%\\#\\&\\textasciitilde{}"
                                         "\\textasciicircum{}\\textbar{}\\textless{}\\textgreater{}"
                                         "\\textquotesingle{}\\textquotedbl{}\\textasciigrave{}-{}")


@needs_dot
@needs_tex
@pytest.mark.parametrize("collapse", [False, True])
def test_tikz_document_compiles_with_pdflatex(tmp_path, circuit, collapse):
    path = tmp_path / "figure.cir"
    path.write_text(emit(circuit))
    args = ["render", str(path), "-o", str(tmp_path / "fig.tex")] + (["--collapse"] if collapse else [])
    assert main(args) == 0
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "fig.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    text = subprocess.run(["pdftotext", "-layout", str(tmp_path / "fig.pdf"), "-"], capture_output=True,
                          text=True, check=True).stdout
    assert "bracket_counting: 82 nodes, 151 edges" in text and "logit ]" in text
    assert ("head 4 q3 k6 v3" in text) if collapse else ("n214" in text and "head 4" in text)
    assert "open-bracket reader" in text or collapse
    pages = subprocess.run(["pdfinfo", str(tmp_path / "fig.pdf")], capture_output=True, text=True).stdout
    assert re.search(r"^Pages:\s+1$", pages, re.M)


@needs_dot
@pytest.mark.parametrize("suffix, magic", [("svg", b"<?xml"), ("pdf", b"%PDF"), ("png", b"\x89PNG"),
                                           ("dot", b"digraph"), ("tikz", b"% circuitir"), ("tex", b"\\document")])
def test_formats_from_the_extension(tmp_path, capsys, suffix, magic):
    out = tmp_path / f"c.{suffix}"
    assert main(["render", str(EXAMPLES / "sparse-brackets.cir"), "-o", str(out), "--collapse"]) == 0
    assert out.read_bytes().startswith(magic)
    assert "collapsed" in capsys.readouterr().out


def test_format_option_and_bad_input(tmp_path, capsys):
    out = tmp_path / "figure.txt"
    assert main(["render", str(EXAMPLES / "bracket_toy.cir"), "-o", str(out), "--format", "dot"]) == 0
    assert out.read_text() == to_dot(parse((EXAMPLES / "bracket_toy.cir").read_text()))
    assert main(["render", str(EXAMPLES / "bracket_toy.cir"), "-o", str(tmp_path / "c.bmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot render to .bmp" in err


def test_write_results_draws_then_writes_json_whole(tmp_path, capsys):
    """The benchmark scripts' ending: the figure through the caller's drawing function, the JSON through the
    default hook, and a JSON that cannot be encoded leaves no file behind."""
    import json

    from circuitir.render.plots import write_results

    drawn = []
    write_results({"x": (1, 2), "n": {3}}, lambda out, path: drawn.append((out["x"], path)), "fig.png",
                  str(tmp_path / "r.json"), json_default=sorted)
    assert drawn == [((1, 2), "fig.png")] and capsys.readouterr().out == "figure: fig.png\n"
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [1, 2], "n": [3]}
    with pytest.raises(TypeError):
        write_results({"n": {3}}, None, None, str(tmp_path / "bad.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
