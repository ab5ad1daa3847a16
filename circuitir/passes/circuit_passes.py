"""Passes from a node mask to a clean Circuit IR: lower, fold-constants, dce.

These are the only implementations of folding and dead-code elimination:
``Circuit.from_mask`` calls the same functions, so a mask gives the same
circuit, bit for bit, from either entry point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch

from circuitir.ir.circuit import Circuit, Node, NodeData, site_specs
from circuitir.ir.topology import MATRICES
from circuitir.passes.manager import PipelineState, register


@dataclass
class NoOptions:
    pass


@register("lower", NoOptions, needs=("graph", "mask"), provides=("circuit",),
          summary="read the kept channels, their nonzero weights and every ablated input (as constants) off the model")
def lower_pass(state: PipelineState, options: NoOptions) -> None:
    from circuitir.ir.lower import lower
    state.circuit = lower(state.graph, state.mask, state.ablation["fills"], candidates=state.candidates,
                          header={"ablation": {"kind": state.ablation["kind"]}, "norm": "live"})


def foldable_sites(circuit: Circuit) -> set[str]:
    """Sites whose constants reach kept nodes only through linear maps: the sources of the topology
    table's direct and activation matrices (not through attention heads), without AbsTopK after them."""
    sources = {(m.sublayer, m.src) for m in MATRICES if m.via != "heads"}
    return {s.name for s in site_specs(circuit.config, len(circuit.candidates))
            if (s.sublayer, s.kind) in sources and s.topk is None}


def fold_constants(circuit: Circuit) -> Circuit:
    """Fold every foldable constant into the biases of the nodes it feeds, and drop it.

    Each bias becomes float32(bias + Σ weight·value), the sum exactly rounded (``math.fsum`` of the
    float32 products, which are exact in float64), so the result does not depend on the order of the
    constants or on which entry point made the circuit."""
    sites = foldable_sites(circuit)
    folded = {n for n, d in circuit.nodes.items() if d.kind == "const" and n.site in sites}
    terms: dict = {}
    for (src, dst), weight in list(circuit.edges.items()):
        if src in folded:
            terms.setdefault(dst, []).append(weight * circuit.nodes[src].value)
            del circuit.edges[(src, dst)]
    for dst, products in terms.items():
        data = circuit.nodes[dst]
        data.bias = _f32(math.fsum([data.bias, *products]))
    for node in folded:
        del circuit.nodes[node]
    return circuit


def _f32(x: float) -> float:
    """The float32 nearest ``x`` as a Python float, never -0.0 (circuits print no signed zeros)."""
    return float(torch.tensor(x, dtype=torch.float32)) + 0.0


@register("fold-constants", NoOptions, needs=("circuit",), provides=("circuit",),
          summary="fold ablated inputs into biases, so nothing refers to an ablated channel it need not")
def fold_pass(state: PipelineState, options: NoOptions) -> None:
    fold_constants(state.circuit)


def eliminate_dead_code(circuit: Circuit, fills: dict | None = None) -> Circuit:
    """Drop nodes (and heads, and norms) with no path to the logits.

    A head that still matters keeps its whole query and key (a circuit invariant), even channels
    with no path of their own (a query channel kept alive by a top-k over the query site, say, while
    the head's keys feed nothing that reaches the logits). A computed channel among those becomes
    the constant it is when ablated, ``fills[site][index]``; any value would give the same logits.
    """
    graph = circuit.graph()
    reaching = set()
    for k in range(len(circuit.candidates)):
        reaching |= nx.ancestors(graph, Node("logits", k)) | {Node("logits", k)}
    d_head = circuit.config["d_head"]
    for (layer, head) in list(circuit.heads):
        channels = range(head * d_head, (head + 1) * d_head)
        parts = [Node(f"{layer}.attn.{part}", c) for part in ("q", "k") for c in channels]
        if not _head_is_used(circuit, graph, reaching, layer, channels):
            del circuit.heads[(layer, head)]
            continue
        for node in parts:
            if node not in reaching and node in circuit.nodes:
                if circuit.nodes[node].kind == "kept":
                    value = 0.0 if fills is None else _f32(float(fills[node.site][node.index]))
                    circuit.nodes[node] = NodeData("const", value=value)
                reaching.add(node)
    dead = [n for n in circuit.nodes if n not in reaching]
    for node in dead:
        del circuit.nodes[node]
    circuit.edges = {(s, d): w for (s, d), w in circuit.edges.items()
                     if s in circuit.nodes and d in circuit.nodes and circuit.nodes[d].kind != "const"}
    for point in [p for p in circuit.norms if p != "final"]:
        if not any(n.site == f"{point}.act_in" and d.kind == "kept" for n, d in circuit.nodes.items()):
            del circuit.norms[point]
    return circuit


def _head_is_used(circuit: Circuit, graph, reaching: set, layer: int, channels) -> bool:
    """What lowering computes a head for: one of its q, k or v channels is a kept node that reaches
    the logits (through the head, or through a top-k over its site that other heads share), or one of
    its v channels writes into a kept residual write that does. Constant q or k channels alone (a
    top-k site keeps every channel live) do not make a head."""
    write_site = f"{layer}.attn.resid_delta"
    for part in ("q", "k", "v"):
        for c in channels:
            node = Node(f"{layer}.attn.{part}", c)
            if node not in reaching or node not in circuit.nodes:
                continue
            if circuit.nodes[node].kind == "kept":
                return True
            # A weight into a write that matters: not a graph successor, which may be a top-k
            # coupling (the v site's top-k makes every v channel an input of every other's reader).
            if part == "v" and any(d.site == write_site and d in reaching and (node, d) in circuit.edges
                                   for d in graph.successors(node)):
                return True
    return False


@register("dce", NoOptions, needs=("circuit",), provides=("circuit",),
          summary="drop nodes and edges with no path to the output (networkx)")
def dce_pass(state: PipelineState, options: NoOptions) -> None:
    eliminate_dead_code(state.circuit, state.ablation["fills"] if state.ablation else None)
