"""Hypothesis strategies for random *valid* Circuit IRs (they pass check_circuit, and parse: they compile and run).

Small models (1-2 layers, a few channels, a vocabulary of 1-12 tokens) so each
example is quick; float32 values of every kind (tiny, subnormal, huge,
negative, -0.0, inf and nan where the IR allows them); headers of every
setting type, nested; sparse and dense tables.
"""

from __future__ import annotations

import networkx as nx
import torch
from hypothesis import strategies as st

from circuitir.grammar.parser import MODEL_WEIGHTS
from circuitir.ir.circuit import (
    Circuit, Node, NodeData, NormData, check_circuit, read_point, site_specs,
)
from circuitir.models.config import ACTIVATION_SPARSITY_LOCATIONS, GPTConfig

ANY_F32 = st.floats(width=32)
WEIGHT = st.floats(width=32, allow_nan=False, allow_infinity=False).filter(lambda x: x != 0.0)
RESIDUAL_KINDS = ("act_in", "resid_delta", "final_resid")

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6))
SETTING_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=4)
KEYS = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,7}", fullmatch=True), st.text(max_size=4))
HEADERS = st.recursive(st.dictionaries(KEYS, SETTING_VALUES, max_size=3),
                       lambda inner: st.dictionaries(KEYS, st.one_of(SETTING_VALUES, inner), max_size=3),
                       max_leaves=8)


@st.composite
def configs(draw) -> dict:
    afrac = draw(st.sampled_from([None, 0.25]))
    locations = draw(st.lists(st.sampled_from(ACTIVATION_SPARSITY_LOCATIONS), min_size=1, unique=True))
    return GPTConfig(
        block_size=draw(st.integers(1, 64)), vocab_size=draw(st.integers(1, 12)), n_layer=draw(st.integers(1, 2)),
        n_head=draw(st.integers(1, 2)), d_head=draw(st.integers(1, 3)), d_model=draw(st.integers(2, 6)),
        d_mlp=draw(st.integers(1, 5)), rms_norm=draw(st.booleans()), sink=draw(st.booleans()),
        enable_bigram_table=draw(st.booleans()), afrac=afrac, afrac_loctypes=",".join(locations),
    ).to_dict()


@st.composite
def tables(draw, length: int) -> torch.Tensor:
    values = draw(st.lists(ANY_F32, min_size=length, max_size=length))
    if draw(st.booleans()):  # mostly zero, as a sparse model's embedding columns are
        keep = draw(st.sets(st.integers(0, length - 1), max_size=max(1, length // 3)))
        values = [v if i in keep else 0.0 for i, v in enumerate(values)]
    return torch.tensor(values, dtype=torch.float32)


@st.composite
def node_data(draw, kind: str) -> NodeData:
    def field(default):
        return draw(st.one_of(st.just(default), ANY_F32))
    return NodeData(kind, bias=field(0.0), value=field(0.0), gain=field(1.0), shift=field(0.0))


@st.composite
def circuits(draw) -> Circuit:
    config = draw(configs())
    vocab = config["vocab_size"]
    candidates = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=3))
    specs = site_specs(config, len(candidates))
    by_name = {s.name: s for s in specs}
    rank = {s.name: i for i, s in enumerate(specs)}
    header = draw(HEADERS)
    if draw(st.booleans()):
        header["norm"] = draw(st.sampled_from(["live", "frozen"]))
    circuit = Circuit(config=config, candidates=candidates, header=header)

    for spec in specs:
        if spec.kind == "logits":
            for k in range(len(candidates)):
                circuit.nodes[Node("logits", k)] = draw(node_data("output"))
            continue
        for index in draw(st.sets(st.integers(0, spec.width - 1), max_size=3)):
            circuit.nodes[Node(spec.name, index)] = draw(node_data(draw(st.sampled_from(["kept", "const"]))))

    d_head = config["d_head"]
    for layer in range(config["n_layer"]):
        for head in range(config["n_head"]):
            channels = range(head * d_head, (head + 1) * d_head)
            needed = any(circuit.nodes.get(Node(f"{layer}.attn.{part}", c), NodeData("const")).kind == "kept"
                         for part in "qkv" for c in channels)
            if needed or draw(st.booleans()):
                circuit.heads[layer, head] = draw(st.one_of(st.none(), ANY_F32))
                for part in "qk":
                    for c in channels:
                        circuit.nodes.setdefault(Node(f"{layer}.attn.{part}", c), draw(node_data("const")))

    ordered = sorted(circuit.nodes, key=lambda n: (rank[n.site], n.index))
    for source in ordered:
        src = by_name[source.site]
        targets = [t for t in ordered if circuit.nodes[t].kind != "const"
                   and (src.kind, by_name[t.site].kind) in MODEL_WEIGHTS
                   and (src.layer, src.sublayer) == (by_name[t.site].layer, by_name[t.site].sublayer)]
        if targets:
            for target in draw(st.lists(st.sampled_from(targets), max_size=2, unique=True)):
                circuit.edges[source, target] = draw(WEIGHT)

    residual = {n.index for n, d in circuit.nodes.items() if by_name[n.site].kind in RESIDUAL_KINDS
                and (d.kind == "kept" or by_name[n.site].kind == "resid_delta")}
    residual |= draw(st.sets(st.integers(0, config["d_model"] - 1), max_size=2))
    for channel in residual:
        circuit.embed[channel] = draw(tables(vocab))
    # Norms: every point the circuit reads (and the final one) has one, as its norm mode requires; other
    # points may have one too.
    points = [read_point(s.name) for s in specs if s.kind in ("act_in", "final_resid")]
    frozen = header.get("norm") == "frozen" or ("norm" not in header and draw(st.booleans()))
    needed = {"final"} | {read_point(n.site) for n, d in circuit.nodes.items()
                          if d.kind == "kept" and by_name[n.site].kind == "act_in"}
    for point in needed | draw(st.sets(st.sampled_from(points))):
        rms = draw(st.booleans())
        inner = point != "final"
        circuit.norms[point] = NormData(
            rms=rms, eps=draw(ANY_F32), width=config["d_model"],
            frozen_scale=draw(ANY_F32) if frozen else None,
            passive_sq=draw(tables(vocab)) if inner and not frozen else draw(st.one_of(st.none(), tables(vocab))),
            passive_sum=draw(tables(vocab)) if inner and not rms else draw(st.one_of(st.none(), tables(vocab))))
    if draw(st.booleans()):
        circuit.bigram = torch.stack([draw(tables(vocab)) for _ in candidates], dim=1)

    make_live_nodes_reach_output(circuit)
    check_circuit(circuit)
    return circuit


def make_live_nodes_reach_output(circuit: Circuit) -> None:
    """Turn kept nodes with no path to a logit into constants (dropping their inputs), until none is left.

    A node with no path to the output cannot be on another node's path to it, so this never strands anyone.
    """
    while True:
        graph = circuit.graph()
        reaching = set()
        for k in range(len(circuit.candidates)):
            reaching |= nx.ancestors(graph, Node("logits", k)) | {Node("logits", k)}
        stranded = [n for n in circuit.kept_nodes() if n not in reaching]
        if not stranded:
            return
        for node in stranded:
            circuit.nodes[node].kind = "const"
        circuit.edges = {(s, d): w for (s, d), w in circuit.edges.items() if d not in stranded}

