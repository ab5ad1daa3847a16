"""Draw a circuit: Graphviz DOT, one cluster per layer and sublayer, heads grouped.

Edge colour is the weight's sign (blue positive, red negative) and its width
grows with |weight|; residual edges are grey and dashed. Constants are not
drawn: they are what the circuit replaced ablated channels by, not mechanism.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from circuitir.errors import UserError
from circuitir.ir.circuit import Circuit, site_specs


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _token_label(circuit: Circuit, k: int) -> str:
    token = circuit.candidates[k]
    return repr(bytes([token]).decode("latin-1")) if circuit.config["vocab_size"] <= 256 else str(token)


def to_dot(circuit: Circuit, title: str | None = None) -> str:
    graph = circuit.graph()
    kept = set(circuit.kept_nodes())
    outputs = [n for n, d in circuit.nodes.items() if d.kind == "output"]
    shown = kept | set(outputs)
    specs = site_specs(circuit.config, len(circuit.candidates))
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f4", '
             'fontname="Helvetica", fontsize=10];', '  edge [arrowsize=0.5];']
    if title:
        lines.append(f"  label={_quote(title)}; labelloc=t;")
    d_head = circuit.config["d_head"]
    groups: dict[str, list] = {}
    for node in circuit.sorted(shown):
        spec = next(s for s in specs if s.name == node.site)
        group = "final" if spec.sublayer == "final" else f"layer {spec.layer} {spec.sublayer}"
        groups.setdefault(group, []).append((node, spec))
    for index, (group, members) in enumerate(groups.items()):
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f"    label={_quote(group)}; style=dashed; color=\"#999999\";")
        heads: dict[int, list] = {}
        for node, spec in members:
            if spec.kind in ("q", "k", "v"):
                heads.setdefault(node.index // d_head, []).append(node)
                continue
            label = str(node) if node.site != "logits" else f"logit {_token_label(circuit, node.index)}"
            lines.append(f"    {_quote(str(node))} [label={_quote(label)}];")
        for head, nodes in sorted(heads.items()):
            lines.append(f"    subgraph cluster_{index}_head{head} {{ label={_quote(f'head {head}')}; color=\"#6a5acd\";")
            for node in nodes:
                lines.append(f"      {_quote(str(node))} [label={_quote(f'{node.site.rsplit(chr(46), 1)[1]}[{node.index}]')}];")
            lines.append("    }")
        lines.append("  }")
    for src, dst, data in graph.edges(data=True):
        if src not in shown or dst not in shown:
            continue
        if data["kind"] == "weight":
            weight = data["weight"]
            color = "#1f5fbf" if weight > 0 else "#c0392b"
            width = min(4.0, 0.5 + 2.0 * abs(weight))
            lines.append(f"  {_quote(str(src))} -> {_quote(str(dst))} [color={_quote(color)}, penwidth={width:.2f}, "
                         f"tooltip={_quote(f'{weight:.4g}')}];")
        elif data["kind"] == "residual":
            lines.append(f"  {_quote(str(src))} -> {_quote(str(dst))} [color=\"#999999\", style=dashed];")
        elif data["kind"] == "pattern":
            lines.append(f"  {_quote(str(src))} -> {_quote(str(dst))} [color=\"#6a5acd\", style=dotted];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(circuit: Circuit, output: str | Path, title: str | None = None) -> None:
    """Write ``output``: DOT source for .dot/.gv, otherwise drawn by Graphviz's ``dot`` (pdf, svg, png)."""
    from circuitir.models.checkpoint import atomic_path

    output = Path(output)
    source = to_dot(circuit, title)
    suffix = output.suffix.lstrip(".").lower()
    with atomic_path(output) as temp:
        if suffix in ("dot", "gv"):
            temp.write_text(source)
            return
        if suffix not in ("pdf", "svg", "png"):
            raise UserError(f"cannot render to .{suffix}: use .dot, .gv, .pdf, .svg or .png")
        dot = shutil.which("dot")
        if dot is None:
            raise UserError("drawing needs Graphviz's `dot` (apt-get install graphviz); "
                            "or write DOT source with -o circuit.dot")
        result = subprocess.run([dot, f"-T{suffix}", "-o", str(temp)], input=source.encode(),
                                capture_output=True, check=False)
        if result.returncode != 0:
            raise UserError(f"dot failed: {result.stderr.decode(errors='replace').strip()[:200]}")
