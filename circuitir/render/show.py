"""``circuitir show``: a circuit on one screen, as a paper would summarise it.

Per block (layer and sublayer, forward order): the residual channels it reads,
its heads with their q/k/v channels, its neurons two to a line with their
labels and edge counts, the channels it writes; the embedding columns as the
tokens that write each channel; the logits and the final read.
"""

from __future__ import annotations

from circuitir.ir.circuit import Circuit
from circuitir.render.structure import (
    blocks, embed_tokens, in_out_edges, label_of, title_of, token_name,
)

WIDTH = 100


def _wrap(prefix: str, items: list[str], width: int, indent: str = "    ", sep: str = "  ") -> list[str]:
    """``prefix`` then the items ``sep`` apart, wrapped at ``width`` between items, never inside one."""
    lines, line = [], prefix.rstrip() if not items else prefix
    for item in items:
        if line != prefix and len(line) + len(sep) + len(item) > width:
            lines.append(line)
            line = indent + item
        else:
            line += ("" if line == prefix else sep) + item
    lines.append(line)
    return lines


def _fold(text: str, width: int, indent: str = "      ") -> list[str]:
    """A line longer than ``width`` folded between words, the rest indented."""
    if len(text) <= width:
        return [text]
    lead = text[:len(text) - len(text.lstrip())]
    return _wrap(lead, text.split(), width, indent, sep=" ")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 2] + ".."


def _channels(nodes) -> str:
    return " ".join(str(n.index) for n in nodes)


def show(circuit: Circuit, width: int = WIDTH) -> str:
    incoming, outgoing = in_out_edges(circuit)
    candidates = " ".join(f"`{token_name(circuit, t)}`" for t in circuit.candidates)
    claims, model_file = circuit.claims, circuit.provenance.model_file
    head_line = title_of(circuit) + f"; candidates {candidates}"
    if claims.loss is not None:
        head_line += f"; loss {claims.loss:.4f}"
        if claims.target_loss is not None:
            head_line += f" (target {claims.target_loss:g})"
    if model_file:
        head_line += f"; model {model_file}"
    lines = _fold(head_line, width, "  ")
    tables = [f"{c}:" + "".join(f" {t}" if w > 0 else f" -{t}" for t, w in embed_tokens(circuit, c))
              for c in sorted(circuit.embed)]
    lines.append(_clip(f"embed, {len(tables)} channels (channel: the tokens writing it most, -x negative):", width))
    lines += _wrap("  ", tables, width, "  ")
    for block in blocks(circuit):
        edges_in = sum(len(incoming.get(n, ())) for n in block.nodes if n not in block.reads)
        count = len(block.nodes) - len(block.outputs)
        lines.append(f"{block.title}: {count} node{'s' * (count != 1)}, {edges_in} edges in")
        if block.reads:
            lines += _wrap(f"  reads {len(block.reads)}: ", [str(n.index) for n in block.reads], width, sep=" ")
        for head in block.heads:
            parts = [f"{part} {_channels(head.channels[part])}" for part in ("q", "k", "v") if head.channels[part]]
            label = next((label_of(circuit, n) for n in head.channels["v"] + head.nodes if label_of(circuit, n)), "")
            writes = sorted({t.index for v in head.channels["v"] for t, _ in outgoing.get(v, ())})
            text = f"  head {head.index}  " + " | ".join(parts)
            if writes:
                text += " -> " + " ".join(map(str, writes))
            lines += _fold(text + (f"  {label}" if label else ""), width)
        if block.neurons:
            column = (width - 2) // 2
            cells = []
            for node in block.neurons:
                counts = f"({len(incoming.get(node, ()))}/{len(outgoing.get(node, ()))})"
                cells.append(_clip(f"{node.index:>4} {counts:>7} {label_of(circuit, node)}", column - 1)
                             .ljust(column))
            lines.append(f"  {len(block.neurons)} neurons (edges in/out), label:")
            for start in range(0, len(cells), 2):
                lines.append(("  " + "".join(cells[start:start + 2])).rstrip())
        if block.writes:
            lines += _wrap(f"  writes {len(block.writes)}: ", [str(n.index) for n in block.writes], width, sep=" ")
        for node in block.outputs:
            sources = incoming.get(node, ())
            text = f"  logit `{token_name(circuit, circuit.candidates[node.index])}` <- {len(sources)} channels"
            label = label_of(circuit, node)
            lines += _fold(text + (f"  {label}" if label and not label.startswith("logit") else ""), width)
    return "\n".join(lines) + "\n"
