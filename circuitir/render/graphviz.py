"""Draw a circuit with Graphviz: layers bottom to top, one band per layer and sublayer.

* **Full** (:func:`to_dot`): every kept node. Residual reads at the bottom of
  their band, writes at the top; a head's q/k/v channels in a box of their
  own under the head's name; a neuron's label under its name.
* **Collapsed** (``collapse=True``): one box per head and per group of
  neurons with the same label, the token embedding and the logits; the
  residual stream is folded away: an edge from A to B sums, over the residual
  channels that A writes and B reads, the products of the weights on the way
  (its width is the sum of their sizes).

Edge colour is the weight's sign (blue positive, red negative) and its width
grows with |weight| (relative to the largest in the figure); residual edges
are grey and dashed, attention-pattern edges (q/k to what the head writes)
violet and dotted. Constants are not drawn: they are what the circuit
replaced ablated channels by, not mechanism. A legend says all this.

``render`` writes DOT source, or asks Graphviz's ``dot`` for SVG, PDF or PNG,
or TikZ (:mod:`circuitir.render.tikz`, laid out by ``dot`` too).
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from circuitir.errors import UserError
from circuitir.ir.circuit import Circuit, Node
from circuitir.render.structure import (
    blocks, embed_tokens, in_out_edges, kind_of, label_of, title_of, token_name,
)

POSITIVE, NEGATIVE, RESIDUAL, PATTERN = "#1f5fbf", "#c0392b", "#999999", "#6a5acd"
BAND_COLOURS = {"attn": "#f3f0fb", "mlp": "#eef6ee", "final": "#f7f3ea", "embed": "#f7f3ea"}
FORMATS = ("svg", "pdf", "png", "dot", "tikz")
SUFFIX_FORMAT = {"svg": "svg", "pdf": "pdf", "png": "png", "dot": "dot", "gv": "dot", "tikz": "tikz", "tex": "tikz"}
FONT = "Helvetica"
MINOR = 0.1  # collapsed figures leave out a box's inputs under this fraction of its largest
SHORT = {"act_in": "r", "final_resid": "r", "resid_delta": "+r", "q": "q", "k": "k", "v": "v", "post_act": "n"}


# ---------------------------------------------------------------- a drawing, format-free

@dataclass
class Box:
    id: str
    title: str
    label: str = ""
    shape: str = "box"
    level: int = 0     # its row, bottom to top: bands stack because their rows do


@dataclass
class Band:
    id: str
    title: str
    colour: str
    boxes: list[Box] = field(default_factory=list)
    groups: list["Band"] = field(default_factory=list)   # heads inside a band


@dataclass
class Arrow:
    source: str
    target: str
    kind: str          # weight, residual, pattern
    weight: float | None = None
    size: float | None = None   # |weight| or, collapsed, the summed sizes


@dataclass
class Drawing:
    title: str
    bands: list[Band]
    arrows: list[Arrow]

    def box_ids(self) -> list[str]:
        return [b.id for band in self.bands for b in band.boxes + [x for g in band.groups for x in g.boxes]]


def node_title(circuit: Circuit, node: Node, kinds: dict[str, str]) -> str:
    if node.site == "logits":
        return f"logit {token_name(circuit, circuit.candidates[node.index])}"
    return f"{SHORT[kinds[node.site]]}{node.index}"


def full_drawing(circuit: Circuit, title: str) -> Drawing:
    kinds = kind_of(circuit)
    bands = []
    for number, block in enumerate(blocks(circuit)):
        band = Band(block.title.replace(" ", "_"), block.title, BAND_COLOURS[block.sublayer])
        levels = [(block.reads, 0), (block.neurons, 1), (block.writes, 2), (block.outputs, 1)]
        for nodes, level in levels:
            for node in nodes:
                name, label = node_title(circuit, node, kinds), label_of(circuit, node)
                band.boxes.append(Box(str(node), name, "" if label == name else label,
                                      "box" if node.site != "logits" else "doubleoctagon", 3 * number + level))
        for head in block.heads:
            group = Band(f"{band.id}_head{head.index}", f"head {head.index}", "#ffffff")
            group.boxes = [Box(str(n), node_title(circuit, n, kinds), label_of(circuit, n), level=3 * number + 1)
                           for n in head.nodes]
            band.groups.append(group)
        bands.append(band)
    shown = {str(n) for n, d in circuit.nodes.items() if d.kind in ("kept", "output")}
    arrows = []
    for src, dst, data in circuit.graph().edges(data=True):
        if str(src) not in shown or str(dst) not in shown or data["kind"] not in ("weight", "residual", "pattern"):
            continue
        weight = data.get("weight")
        arrows.append(Arrow(str(src), str(dst), data["kind"], weight,
                            abs(weight) if data["kind"] == "weight" else None))
    return Drawing(title, bands, arrows)


def collapsed_drawing(circuit: Circuit, title: str) -> Drawing:
    """One box per head, per group of same-label neurons, the embedding and each logit (see the module doc)."""
    incoming, outgoing = in_out_edges(circuit)
    kinds = kind_of(circuit)
    owner: dict[Node, str] = {}      # computing node -> box id
    bands = [Band("embedding", "token embedding", BAND_COLOURS["embed"])]
    read_channels = sorted({n.index for b in blocks(circuit) for n in b.reads})
    tokens = []
    for channel in read_channels:
        tokens += [t for t, _ in embed_tokens(circuit, channel, most=2)]
    common = list(dict.fromkeys(tokens))[:8]
    bands[0].boxes.append(Box("embed", f"embedding ({len(circuit.embed)} ch.)", " ".join(common)))
    for number, block in enumerate(blocks(circuit), start=1):
        band = Band(block.title.replace(" ", "_"), block.title, BAND_COLOURS[block.sublayer])
        for head in block.heads:
            box_id = f"{block.layer}.head{head.index}"
            parts = " ".join(f"{p}{len(head.channels[p])}" for p in ("q", "k", "v") if head.channels[p])
            label = next((label_of(circuit, n) for n in head.channels["v"] + head.nodes if label_of(circuit, n)), "")
            band.boxes.append(Box(box_id, f"head {head.index} {parts}", label, level=number))
            owner.update({n: box_id for n in head.nodes})
        groups: dict[str, list[Node]] = defaultdict(list)
        for neuron in block.neurons:
            groups[label_of(circuit, neuron)].append(neuron)
        for group, (label, neurons) in enumerate(groups.items()):
            box_id = f"{block.layer}.mlp.group{group}"
            names = ",".join(str(n.index) for n in neurons)
            text = f"n{names}" if len(neurons) == 1 else f"{len(neurons)} neurons"
            band.boxes.append(Box(box_id, text, label, level=number))
            owner.update({n: box_id for n in neurons})
        for node in block.outputs:
            band.boxes.append(Box(str(node), node_title(circuit, node, kinds), "", "doubleoctagon", number))
            owner[node] = str(node)
        if band.boxes:
            bands.append(band)
    # Fold the residual stream: box A -> write c -> (later) read c -> box B.
    rank = {name: i for i, name in enumerate(kinds)}
    writes: dict[int, list[tuple[str, float, Node]]] = defaultdict(list)  # channel -> (box, weight, write node)
    for node, data in circuit.nodes.items():
        if data.kind == "kept" and kinds[node.site] == "resid_delta":
            for source, weight in incoming.get(node, ()):
                if source in owner:
                    writes[node.index].append((owner[source], weight, node))
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for node, data in circuit.nodes.items():
        if data.kind != "kept" or kinds[node.site] not in ("act_in", "final_resid"):
            continue
        for target, weight in outgoing.get(node, ()):
            if target not in owner:
                continue
            sources = [(box, w) for box, w, write in writes.get(node.index, ()) if rank[write.site] < rank[node.site]]
            if node.index in circuit.embed:  # the embedding is a weight too: token -> channel, at most this
                sources.append(("embed", float(circuit.embed[node.index].abs().max())))
            for box, first in sources:
                if box == owner[target]:
                    continue
                total = totals[box, owner[target]]
                total[0] += first * weight
                total[1] += abs(first * weight)
    # A summary: a box's inputs under MINOR of its largest are left out (the legend says so).
    strongest: dict[str, float] = defaultdict(float)
    for (_, target), (_, size) in totals.items():
        strongest[target] = max(strongest[target], size)
    arrows = [Arrow(a, b, "weight", signed, size) for (a, b), (signed, size) in totals.items()
              if size >= MINOR * strongest[b]]
    return Drawing(title, bands, arrows)


# ---------------------------------------------------------------- DOT

def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _html(text: str) -> str:
    return html.escape(text, quote=True)


def label_lines(label: str) -> list[str]:
    """A label as short lines: its ``|``-separated parts one a line (figures stay narrow)."""
    return [part.strip() for part in label.split(" | ") if part.strip()]


def _box_label(box: Box, font_size: int) -> str:
    if not box.label:
        return f"<{_html(box.title)}>"
    small = "<br/>".join(_html(line) for line in label_lines(box.label))
    return f"<{_html(box.title)}<br/><font point-size=\"{font_size - 2}\" color=\"#444444\">{small}</font>>"


def edge_style(arrow: Arrow, largest: float) -> dict[str, str]:
    """Colour, width and line style of an arrow (shared by DOT and TikZ)."""
    if arrow.kind == "residual":
        return {"color": RESIDUAL, "penwidth": "0.8", "style": "dashed"}
    if arrow.kind == "pattern":
        return {"color": PATTERN, "penwidth": "0.8", "style": "dotted"}
    width = 0.6 + 2.6 * min(1.0, (arrow.size or 0.0) / largest) if largest > 0 else 1.0
    return {"color": POSITIVE if (arrow.weight or 0.0) >= 0 else NEGATIVE, "penwidth": f"{width:.2f}",
            "style": "solid"}


LEGEND = (("weight > 0", POSITIVE, "solid"), ("weight < 0", NEGATIVE, "solid"),
          ("residual", RESIDUAL, "dashed"), ("attention", PATTERN, "dotted"))


LABEL_NOTE = ("labels: on X: fires on tokens X", "ans A>B: higher when the", "answer is A than B")


def legend_rows(collapsed: bool) -> list[tuple[str, str | None, str | None]]:
    """The legend, for DOT and TikZ alike: (text, line colour or None, line style)."""
    rows = [(name, colour, style) for name, colour, style in (LEGEND[:2] if collapsed else LEGEND)]
    notes = ["width: |weight|" + (", summed over" if collapsed else "")]
    if collapsed:
        notes += ["residual-stream paths; inputs under", f"{MINOR:.0%} of a box's largest not drawn"]
    return rows + [(note, None, None) for note in notes + list(LABEL_NOTE)]


def legend_html(collapsed: bool) -> str:
    marks = {"solid": "&#9472;&#9472;", "dashed": "- -", "dotted": "&#183;&#183;&#183;"}
    cells = []
    for text, colour, style in legend_rows(collapsed):
        mark = f"<font color=\"{colour}\">{marks[style]}</font> " if colour else ""
        cells.append(f"<tr><td align=\"left\">{mark}{_html(text)}</td></tr>")
    return f"<<table border=\"0\" cellspacing=\"0\" cellpadding=\"1\">{''.join(cells)}</table>>"


def _cluster(band: Band, name: str, indent: str, font_size: int) -> list[str]:
    """A band (or a head inside one) as a DOT cluster, its boxes and nested groups inside."""
    outer = indent == "  "
    style = (f'labeljust=l; labelloc=b; style="filled,rounded"; color="#bbbbbb"; fillcolor="{band.colour}";'
             if outer else f'style="rounded,filled"; fillcolor="#ffffff"; color="{PATTERN}";')
    lines = [f"{indent}subgraph {name} {{", f"{indent}  label={_quote(band.title)}; {style}"]
    for box in band.boxes:
        lines.append(f"{indent}  {_quote(box.id)} [label={_box_label(box, font_size)}, shape={box.shape}];")
    for index, group in enumerate(band.groups):
        lines += _cluster(group, f"{name}_{index}", indent + "  ", font_size)
    return lines + [f"{indent}}}"]


def drawing_rows(drawing: Drawing, max_row: int) -> list[list[str]]:
    """Box ids by row, bottom to top: one row a level, a level of more than ``max_row`` boxes split in rows
    of equal length (a band of 23 residual reads becomes two rows, not one 23 boxes wide)."""
    levels: dict[int, list[str]] = defaultdict(list)
    for band in drawing.bands:
        for box in band.boxes + [b for g in band.groups for b in g.boxes]:
            levels[box.level].append(box.id)
    rows = []
    for level in sorted(levels):
        ids = levels[level]
        count = -(-len(ids) // max_row)
        size = -(-len(ids) // count)
        rows += [ids[start:start + size] for start in range(0, len(ids), size)]
    return rows


def drawing_to_dot(drawing: Drawing, collapsed: bool = False, font_size: int = 10, max_row: int | None = None) -> str:
    """DOT source; rows hold at most ``max_row`` boxes (default: 12, collapsed 6: a paper's column)."""
    max_row = max_row or (6 if collapsed else 12)
    lines = ["digraph circuit {",
             "  rankdir=BT; newrank=true; nodesep=0.12; ranksep=0.3; compound=true;",
             f'  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="{FONT}", '
             f'fontsize={font_size}, margin="0.05,0.02", height=0.25];',
             f'  edge [arrowsize=0.5]; graph [fontname="{FONT}", fontsize={font_size}];']
    if drawing.title:
        lines.append(f"  label={_quote(drawing.title)}; labelloc=t;")
    for number, band in enumerate(drawing.bands):
        lines += _cluster(band, f"cluster_{number}", "  ", font_size)
    lines.append(f'  legend [shape=plaintext, style="", label={legend_html(collapsed)}, fontsize={font_size - 2}];')
    rows = drawing_rows(drawing, max_row)
    rows[-1].append("legend")  # beside the top row, where there is room
    # Invisible anchors, one a row and chained, put the rows (hence the bands) in order, bottom to top.
    for number, row in enumerate(rows):
        lines.append(f"  row{number} [shape=point, style=invis, width=0, height=0];")
        lines.append(f"  {{ rank=same; row{number}; {'; '.join(_quote(b) for b in row)}; }}")
        if number:
            lines.append(f"  row{number - 1} -> row{number} [style=invis];")
    largest = max((a.size or 0.0 for a in drawing.arrows if a.kind == "weight"), default=0.0)
    for arrow in drawing.arrows:
        style = edge_style(arrow, largest)
        tip = "" if arrow.weight is None else f", tooltip={_quote(f'{arrow.weight:.4g}')}"
        lines.append(f"  {_quote(arrow.source)} -> {_quote(arrow.target)} [color={_quote(style['color'])}, "
                     f"penwidth={style['penwidth']}, style={style['style']}{tip}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def make_drawing(circuit: Circuit, title: str | None = None, collapse: bool = False) -> Drawing:
    title = title_of(circuit) if title is None else title
    return collapsed_drawing(circuit, title) if collapse else full_drawing(circuit, title)


def to_dot(circuit: Circuit, title: str | None = None, collapse: bool = False) -> str:
    return drawing_to_dot(make_drawing(circuit, title, collapse), collapse)


# ---------------------------------------------------------------- running dot

def run_dot(source: str, fmt: str) -> bytes:
    dot = shutil.which("dot")
    if dot is None:
        raise UserError("drawing needs Graphviz's `dot` (apt-get install graphviz); "
                        "or write DOT source with -o circuit.dot")
    result = subprocess.run([dot, f"-T{fmt}"], input=source.encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise UserError(f"dot failed: {result.stderr.decode(errors='replace').strip()[:200]}")
    return result.stdout


def format_for(output: str | Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"unknown format {fmt!r} (use one of: {', '.join(FORMATS)})")
        return fmt
    suffix = Path(output).suffix.lstrip(".").lower()
    if suffix not in SUFFIX_FORMAT:
        raise UserError(f"cannot render to .{suffix}: use .dot, .gv, .pdf, .svg, .png, .tikz or .tex "
                        f"(or give --format)")
    return SUFFIX_FORMAT[suffix]


def render_bytes(circuit: Circuit, fmt: str, title: str | None = None, collapse: bool = False,
                 document: bool = False) -> bytes:
    """The figure in ``fmt``; for TikZ, ``document`` gives a whole LaTeX document (pdflatex makes the figure)."""
    drawing = make_drawing(circuit, title, collapse)
    source = drawing_to_dot(drawing, collapse)
    if fmt == "dot":
        return source.encode()
    if fmt == "tikz":
        from circuitir.render.tikz import standalone, to_tikz

        picture = to_tikz(drawing, run_dot(source, "json"), collapse)
        return (standalone(picture) if document else picture).encode()
    return run_dot(source, fmt)


def render(circuit: Circuit, output: str | Path, title: str | None = None, fmt: str | None = None,
           collapse: bool = False) -> str:
    """Write ``output`` (atomically) in ``fmt`` (default: from its extension); returns the format.

    TikZ goes to ``.tikz`` as a picture to ``\\input``, to ``.tex`` as a document of its own."""
    from circuitir.models.checkpoint import atomic_path

    fmt = format_for(output, fmt)
    data = render_bytes(circuit, fmt, title, collapse, document=Path(output).suffix.lower() == ".tex")
    with atomic_path(output) as temp:
        temp.write_bytes(data)
    return fmt
