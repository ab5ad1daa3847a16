"""Circuit IR: the channel-level circuit, a plain dataclass over a networkx graph.

A circuit is everything needed to compute a task's candidate logits from
token ids *without the model*, given that every channel outside the circuit is
ablated (replaced by a constant). Its parts:

* ``nodes``: kept channels (``kind="kept"``, computed from other nodes),
  constant channels (``kind="const"``, an ablated channel whose stand-in value
  cannot be folded into a bias, e.g. at a site followed by AbsTopK or inside an
  attention head the circuit computes), and the ``logits`` outputs, one per
  candidate token. A node carries its folded ``bias`` (q/k/v, MLP neurons,
  residual writes, logits), its ``value`` (constants) or the norm ``gain`` and
  ``shift`` (residual reads, ``*.act_in``).
* ``edges``: the nonzero weights between nodes, ``(src, dst) -> weight``.
  Residual edges (a write of channel c to a later read of c) are implied by
  the site order and appear in :meth:`graph`, not here.
* ``embed``: the token-embedding column of every residual channel the circuit
  tracks; ``norms``: for every norm, the statistics of the residual channels
  the circuit does *not* track (per-token tables), or a frozen scale;
  ``heads``: the attention heads the circuit computes, with their sink logit;
  ``bigram``: the bigram-table columns of the candidates, when the model has one.
* ``header``: where it came from and what it claims (source model hash and
  config, task, ablation, norm mode, pipeline, metrics, logit calibration).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import networkx as nx
import torch

from circuitir.ir.topology import SITES, site_name, width_of

LANGUAGE_VERSION = 1


class Node(NamedTuple):
    site: str
    index: int

    def __str__(self) -> str:
        return f"{self.site}[{self.index}]"


NODE_RE = re.compile(r"^(?P<site>[A-Za-z0-9_.]+)\[(?P<index>\d+)\]$")


def parse_node(text: str) -> Node:
    match = NODE_RE.match(text)
    if not match:
        raise ValueError(f"not a node name: {text!r} (expected site[index], e.g. 0.attn.q[17])")
    return Node(match["site"], int(match["index"]))


# ---------------------------------------------------------------- sites

@dataclass(frozen=True)
class SiteSpec:
    name: str
    width: int
    layer: int          # n_layer for final_resid / logits
    sublayer: str       # "attn", "mlp", "final"
    kind: str           # act_in, q, k, v, post_act, resid_delta, final_resid, logits
    topk: str | None    # activation-sparsity location applied right after the site


def site_specs(config: dict, n_candidates: int = 2) -> list[SiteSpec]:
    """Every site in forward order (then the logits pseudo-site), from the topology table."""
    locations = set(config["afrac_loctypes"].split(",")) if config.get("afrac") is not None else set()
    out = [SiteSpec(site_name(layer, rule.sublayer, rule.kind), width_of(rule, config), layer, rule.sublayer,
                    rule.kind, rule.topk if rule.topk in locations else None)
           for layer in range(config["n_layer"]) for rule in SITES]
    out.append(SiteSpec("final_resid", config["d_model"], config["n_layer"], "final", "final_resid", None))
    out.append(SiteSpec("logits", n_candidates, config["n_layer"], "final", "logits", None))
    return out


def site_rank(config: dict) -> dict[str, int]:
    return {spec.name: i for i, spec in enumerate(site_specs(config))}


def read_point(site: str) -> str:
    """The norm a residual read goes through: ``0.attn.act_in`` -> ``0.attn``; final_resid -> ``final``."""
    return "final" if site == "final_resid" else site.rsplit(".", 1)[0]


# ---------------------------------------------------------------- data

@dataclass
class NodeData:
    kind: str               # "kept", "const" or "output"
    bias: float = 0.0       # kept q/k/v/post_act (pre-activation)/resid_delta, and logits
    value: float = 0.0      # const: the stand-in value
    gain: float = 1.0       # kept act_in: the norm's weight for this channel
    shift: float = 0.0      # kept act_in: the norm's bias (LayerNorm)


@dataclass
class NormData:
    """How one norm's statistics are computed from what the circuit tracks.

    ``frozen_scale`` replaces the per-token 1/rms (1/std) when the circuit's
    norm mode is frozen. Otherwise the untracked residual channels contribute
    ``passive_sq[token]`` (sum of squares) and ``passive_sum[token]`` (sum),
    which are exact because every untracked channel is the token's embedding
    plus constants.
    """
    rms: bool
    eps: float
    width: int
    frozen_scale: float | None = None
    passive_sq: torch.Tensor | None = None   # (vocab,)
    passive_sum: torch.Tensor | None = None  # (vocab,)


@dataclass
class Circuit:
    config: dict
    candidates: list[int]
    nodes: dict[Node, NodeData] = field(default_factory=dict)
    edges: dict[tuple[Node, Node], float] = field(default_factory=dict)
    embed: dict[int, torch.Tensor] = field(default_factory=dict)
    norms: dict[str, NormData] = field(default_factory=dict)
    heads: dict[tuple[int, int], float | None] = field(default_factory=dict)
    bigram: torch.Tensor | None = None  # (vocab, n_candidates)
    header: dict = field(default_factory=dict)

    # ------------------------------------------------------------ views
    def kept_nodes(self) -> list[Node]:
        return self.sorted([n for n, d in self.nodes.items() if d.kind == "kept"])

    def const_nodes(self) -> list[Node]:
        return self.sorted([n for n, d in self.nodes.items() if d.kind == "const"])

    def sorted(self, nodes) -> list[Node]:
        rank = site_rank(self.config)
        return sorted(nodes, key=lambda n: (rank[n.site], n.index))

    def site_nodes(self, site: str, kinds=("kept", "const")) -> list[int]:
        return sorted(n.index for n, d in self.nodes.items() if n.site == site and d.kind in kinds)

    def tracked_channels(self) -> list[int]:
        """Residual channels whose value the circuit computes (embedding column + writes)."""
        return sorted(self.embed)

    @property
    def norm_mode(self) -> str:
        """``frozen`` when the norms carry constant scales, else ``live``: read off the norms the runtime
        uses, not the header (whose ``norm`` entry, when present, must agree: see :meth:`verify`)."""
        final = self.norms.get("final")
        if final is not None:
            return "frozen" if final.frozen_scale is not None else "live"
        return "frozen" if self.header.get("norm") == "frozen" else "live"

    @property
    def n_nodes(self) -> int:
        return len(self.kept_nodes())

    @property
    def n_edges(self) -> int:
        """Edges between kept nodes (and into the logits): nonzero weights plus residual edges.

        Edges from constants are not counted: a constant is what the circuit replaced a channel
        by, not part of the mechanism (the paper counts the same way)."""
        return sum(1 for src, _, data in self.graph().edges(data=True)
                   if data["kind"] in ("weight", "residual") and self.nodes[src].kind == "kept")

    def graph(self) -> nx.DiGraph:
        """All nodes and every dependency: weights, residual edges, attention patterns, norm statistics."""
        graph = nx.DiGraph()
        for node, data in self.nodes.items():
            graph.add_node(node, kind=data.kind)
        for (src, dst), weight in self.edges.items():
            graph.add_edge(src, dst, kind="weight", weight=weight)
        specs = {s.name: s for s in site_specs(self.config, len(self.candidates))}
        rank = site_rank(self.config)
        writes = [n for n in self.nodes if specs[n.site].kind == "resid_delta"]
        reads = [n for n, d in self.nodes.items() if specs[n.site].kind in ("act_in", "final_resid")]
        live_norm = self.norm_mode == "live"

        def couples(point: str) -> bool:
            """Whether a norm's statistics depend on the values it reads (live scale, or a LayerNorm mean)."""
            norm = self.norms.get(point)
            return live_norm or (norm is not None and not norm.rms)

        for write in writes:
            for read in reads:
                if rank[read.site] <= rank[write.site]:
                    continue
                if read.index == write.index:
                    graph.add_edge(write, read, kind="residual", weight=1.0)
                elif couples(read_point(read.site)) and self.nodes[read].kind == "kept":
                    graph.add_edge(write, read, kind="norm", weight=None)
        # The final norm sees every final_resid channel: each one (kept or constant) shapes every logit.
        if couples("final"):
            for node, data in self.nodes.items():
                if node.site == "final_resid":
                    for k in range(len(self.candidates)):
                        if not graph.has_edge(node, Node("logits", k)):
                            graph.add_edge(node, Node("logits", k), kind="norm", weight=None)
        # Attention: every q/k channel of a head shapes the pattern that carries its v channels.
        head_width = self.config["d_head"]
        for (layer, head) in self.heads:
            channels = range(head * head_width, (head + 1) * head_width)
            pattern_nodes = [Node(f"{layer}.attn.{s}", c) for s in ("q", "k") for c in channels]
            value_nodes = [Node(f"{layer}.attn.v", c) for c in channels]
            targets = {dst for v in value_nodes if v in graph for dst in graph.successors(v)}
            for node in pattern_nodes:
                if node in graph:
                    for dst in targets:
                        graph.add_edge(node, dst, kind="pattern", weight=None)
        # AbsTopK couples every live channel of a site to every consumer of that site.
        for spec in specs.values():
            if spec.topk is None:
                continue
            members = [n for n in graph if n.site == spec.name]
            consumers = {dst for n in members for dst in graph.successors(n)}
            for node in members:
                for dst in consumers:
                    if not graph.has_edge(node, dst):
                        graph.add_edge(node, dst, kind="topk", weight=None)
        return graph

    # ------------------------------------------------------------ equality
    def canonical(self) -> dict:
        """A plain, exactly comparable form (tensors as float lists)."""
        def floats(t):
            return None if t is None else [float(x) for x in t.flatten().tolist()]
        return {
            "config": self.config, "candidates": list(self.candidates), "header": self.header,
            "nodes": {str(n): (d.kind, d.bias, d.value, d.gain, d.shift) for n, d in self.nodes.items()},
            "edges": {(str(s), str(d)): w for (s, d), w in self.edges.items()},
            "embed": {c: floats(t) for c, t in self.embed.items()},
            "norms": {k: (v.rms, v.eps, v.width, v.frozen_scale, floats(v.passive_sq), floats(v.passive_sum))
                      for k, v in self.norms.items()},
            "heads": dict(self.heads),
            "bigram": floats(self.bigram),
            "bigram_shape": None if self.bigram is None else tuple(self.bigram.shape),
        }

    def __eq__(self, other) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return _nan_safe(self.canonical()) == _nan_safe(other.canonical())

    # ------------------------------------------------------------ invariants
    def verify(self, reachable: bool = True) -> None:
        """Raise :class:`CircuitError` naming the first broken invariant. ``reachable=False`` skips the one
        invariant an unfolded, not yet dead-code-eliminated circuit may break (every kept node reaches the
        output): what the pass manager checks after ``lower`` and ``fold-constants``."""
        check_circuit(self, reachable)

    # ------------------------------------------------------------ construction and use
    @classmethod
    def from_mask(cls, model, mask, **kwargs) -> "Circuit":
        """``model`` (an nn.Module or a loaded model) with every node outside ``mask`` ablated, as a circuit:
        lower -> fold-constants -> dce, what the pipeline runs."""
        from circuitir.ir.lower import circuit_from_mask
        return circuit_from_mask(getattr(model, "model", model), mask, **kwargs)

    def text(self) -> str:
        """The circuit as canonical .cir text."""
        from circuitir.grammar import emit
        return emit(self)

    def save(self, path) -> None:
        """Write the .cir file atomically (an interrupted save leaves no half-written file)."""
        from circuitir.models.checkpoint import atomic_write_text
        atomic_write_text(path, self.text())

    def compile(self):
        """A ``torch.fx.GraphModule``: token ids (B, T) -> candidate logits (B, T, K), without the model."""
        from circuitir.runtime.compile import compile_circuit
        return compile_circuit(self)

    def run(self, prompts) -> list[dict]:
        """The circuit alone on prompts: each candidate's logit at the last token, and which wins."""
        from circuitir.runtime.run import run_prompts
        return run_prompts(self, [prompts] if isinstance(prompts, str) else list(prompts))


def _nan_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if isinstance(obj, dict):
        return {k: _nan_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_nan_safe(v) for v in obj)
    return obj


class CircuitError(ValueError):
    """A circuit breaks one of its invariants."""


def check_circuit(circuit: Circuit, reachable: bool = True) -> None:
    specs = {s.name: s for s in site_specs(circuit.config, len(circuit.candidates))}
    rank = site_rank(circuit.config)

    def fail(message):
        raise CircuitError(message)

    for node, data in circuit.nodes.items():
        if node.site not in specs:
            fail(f"node {node}: unknown site {node.site!r}")
        if not 0 <= node.index < specs[node.site].width:
            fail(f"node {node}: index out of range for {node.site} (width {specs[node.site].width})")
        expected = "output" if node.site == "logits" else None
        if expected and data.kind != "output":
            fail(f"node {node}: logits nodes must be outputs")
        if node.site != "logits" and data.kind not in ("kept", "const"):
            fail(f"node {node}: kind must be kept or const, not {data.kind!r}")
    for k in range(len(circuit.candidates)):
        if Node("logits", k) not in circuit.nodes:
            fail(f"output logits[{k}] (candidate token {circuit.candidates[k]}) is not declared")
    for (src, dst), weight in circuit.edges.items():
        for end in (src, dst):
            if end not in circuit.nodes:
                fail(f"edge {src} -> {dst}: node {end} is not declared")
        if circuit.nodes[dst].kind != "kept" and dst.site != "logits":
            fail(f"edge {src} -> {dst}: only kept nodes and logits take inputs ({dst} is {circuit.nodes[dst].kind})")
        if rank[src.site] >= rank[dst.site]:
            fail(f"edge {src} -> {dst}: edges must go forward through the model")
        if not math.isfinite(weight) or weight == 0.0:
            fail(f"edge {src} -> {dst}: weight must be finite and nonzero, got {weight}")
    head_width = circuit.config["d_head"]
    for node, data in circuit.nodes.items():
        kind = specs[node.site].kind
        if kind in ("q", "k", "v") and data.kind == "kept":
            layer = specs[node.site].layer
            if (layer, node.index // head_width) not in circuit.heads:
                fail(f"node {node}: its head {layer}.attn.head[{node.index // head_width}] is not declared")
        if kind in ("act_in", "resid_delta", "final_resid") and data.kind == "kept" or \
                kind in ("resid_delta",) and data.kind == "const":
            if node.index not in circuit.embed:
                fail(f"node {node}: residual channel {node.index} has no embedding column")
    for (layer, head) in circuit.heads:
        channels = range(head * head_width, (head + 1) * head_width)
        for part in ("q", "k"):
            missing = [c for c in channels if Node(f"{layer}.attn.{part}", c) not in circuit.nodes]
            if missing:
                fail(f"head {layer}.attn.head[{head}]: {part} channel {missing[0]} is neither kept nor constant "
                     f"(a head needs its whole query and key)")
    # Norms: what compile reads to compute every kept residual read.
    declared = circuit.header.get("norm")
    if declared is not None and declared != circuit.norm_mode:
        fail(f"the header's norm mode is {declared!r}, but the norms are {circuit.norm_mode} "
             f"({'no' if circuit.norm_mode == 'live' else 'a'} frozen scale on the final norm)")
    vocab = circuit.config["vocab_size"]
    for channel, column in circuit.embed.items():
        if tuple(column.shape) != (vocab,):
            fail(f"embedding column {channel}: shape {tuple(column.shape)}, expected ({vocab},)")
    for name, norm in circuit.norms.items():
        for table in (norm.passive_sq, norm.passive_sum):
            if table is not None and tuple(table.shape) != (vocab,):
                fail(f"norm {name}: table shape {tuple(table.shape)}, expected ({vocab},)")
    if circuit.bigram is not None and tuple(circuit.bigram.shape) != (vocab, len(circuit.candidates)):
        fail(f"bigram: shape {tuple(circuit.bigram.shape)}, expected ({vocab}, {len(circuit.candidates)})")
    if not reachable:
        return
    graph = circuit.graph()
    outputs = [Node("logits", k) for k in range(len(circuit.candidates))]
    reaching = set(outputs)
    for out in outputs:
        reaching |= nx.ancestors(graph, out)
    for node in circuit.kept_nodes():
        if node not in reaching:
            fail(f"node {node} has no path to the output")
