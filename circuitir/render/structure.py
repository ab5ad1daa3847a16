"""A circuit as a reader sees it: blocks (layer and sublayer), heads with their q/k/v channels, neurons,
residual reads and writes, each with its label. ``show``, the figures and the report draw from this."""

from __future__ import annotations

from dataclasses import dataclass, field

from circuitir.explain import display_text
from circuitir.ir.circuit import Circuit, Node, site_specs


@dataclass
class Head:
    layer: int
    index: int
    channels: dict[str, list[Node]]   # "q", "k", "v" -> kept nodes

    @property
    def name(self) -> str:
        return f"{self.layer}.attn.head[{self.index}]"

    @property
    def nodes(self) -> list[Node]:
        return [n for part in ("q", "k", "v") for n in self.channels[part]]


@dataclass
class Block:
    title: str                         # "layer 0 attn", "layer 1 mlp", "final"
    layer: int
    sublayer: str                      # "attn", "mlp", "final"
    reads: list[Node] = field(default_factory=list)      # act_in / final_resid
    heads: list[Head] = field(default_factory=list)
    neurons: list[Node] = field(default_factory=list)    # post_act
    writes: list[Node] = field(default_factory=list)     # resid_delta
    outputs: list[Node] = field(default_factory=list)    # logits

    @property
    def nodes(self) -> list[Node]:
        return self.reads + [n for h in self.heads for n in h.nodes] + self.neurons + self.writes + self.outputs


def kind_of(circuit: Circuit) -> dict[str, str]:
    return {s.name: s.kind for s in site_specs(circuit.config, len(circuit.candidates))}


def blocks(circuit: Circuit) -> list[Block]:
    """The non-empty blocks in forward order, holding the kept nodes and outputs."""
    specs = {s.name: s for s in site_specs(circuit.config, len(circuit.candidates))}
    shown = circuit.sorted(n for n, d in circuit.nodes.items() if d.kind in ("kept", "output"))
    d_head = circuit.config["d_head"]
    out: dict[tuple[int, str], Block] = {}
    for node in shown:
        spec = specs[node.site]
        key = (spec.layer, spec.sublayer)
        if key not in out:
            title = "final" if spec.sublayer == "final" else f"layer {spec.layer} {spec.sublayer}"
            out[key] = Block(title, spec.layer, spec.sublayer)
        block = out[key]
        if spec.kind in ("act_in", "final_resid"):
            block.reads.append(node)
        elif spec.kind in ("q", "k", "v"):
            head = next((h for h in block.heads if h.index == node.index // d_head), None)
            if head is None:
                head = Head(spec.layer, node.index // d_head, {"q": [], "k": [], "v": []})
                block.heads.append(head)
            head.channels[spec.kind].append(node)
        elif spec.kind == "post_act":
            block.neurons.append(node)
        elif spec.kind == "resid_delta":
            block.writes.append(node)
        else:
            block.outputs.append(node)
    for block in out.values():
        block.heads.sort(key=lambda h: h.index)
    return list(out.values())


def label_of(circuit: Circuit, node: Node) -> str:
    label = circuit.labels.get(node)
    return label.text if label is not None else ""


def token_name(circuit: Circuit, token: int) -> str:
    """A candidate or table token as text: the byte for byte-level models (escaped), else its id."""
    if circuit.config["vocab_size"] != 256:
        return str(token)
    return display_text(bytes([token]).decode("latin-1"))


def embed_tokens(circuit: Circuit, channel: int, most: int = 3, share: float = 0.5) -> list[tuple[str, float]]:
    """The tokens writing residual channel ``channel`` most: up to ``most`` with |w| >= ``share`` of the max."""
    column = circuit.embed.get(channel)
    if column is None:
        return []
    order = column.abs().argsort(descending=True)[:most].tolist()
    peak = float(column.abs().max())
    return [(token_name(circuit, t), float(column[t])) for t in order
            if peak > 0 and abs(float(column[t])) >= share * peak]


def in_out_edges(circuit: Circuit) -> tuple[dict[Node, list], dict[Node, list]]:
    """Weight edges between kept nodes and outputs, by target and by source: (other end, weight)."""
    incoming: dict[Node, list] = {}
    outgoing: dict[Node, list] = {}
    for (source, target), weight in circuit.edges.items():
        if circuit.nodes[source].kind != "kept":
            continue
        incoming.setdefault(target, []).append((source, weight))
        outgoing.setdefault(source, []).append((target, weight))
    return incoming, outgoing


def title_of(circuit: Circuit) -> str:
    return f"{circuit.provenance.task or 'circuit'}: {circuit.n_nodes} nodes, {circuit.n_edges} edges"
