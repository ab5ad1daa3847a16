"""Lowering: a model and a node mask to a Circuit IR.

The circuit computes exactly what the model computes with every channel
outside the mask ablated, while keeping only what that needs:

* A kept node keeps its nonzero incoming weights from *live* nodes (kept, or
  constant); the inputs from other ablated channels are constants, folded into
  its bias.
* An ablated channel stays in the circuit as a ``const`` node only where its
  value cannot be folded: at a site followed by AbsTopK (the top-k sees every
  channel), in the query and key of an attention head the circuit computes
  (softmax is not linear), in a value channel such a head carries into a kept
  write, at a residual write of a channel the circuit tracks, and at
  ``final_resid`` (the final norm sees every channel).
* Residual channels the circuit reads or writes are *tracked*: their
  embedding column is kept and their writes added up. Every other channel is
  the token's embedding plus constants, so its share of each norm's statistics
  is a per-token table (``NormData.passive_sq`` / ``passive_sum``).

Then dead-code elimination: kept nodes with no path to the logits (through
weights, residual edges, attention patterns, norm statistics or top-k
coupling: see :meth:`Circuit.graph`) are dropped and the circuit rebuilt from
the smaller mask, until nothing changes. Dropping them cannot change the
logits, because the graph lists every way a node can influence them.
"""

from __future__ import annotations

import networkx as nx
import torch

from circuitir.errors import UserError
from circuitir.ir.ablation import check_mask, fills_for
from circuitir.ir.circuit import Circuit, Node, NodeData, NormData, site_specs

F32 = torch.float32


def f32(x) -> float:
    """A Python float that is exactly a float32 (so text round-trips are exact)."""
    return float(torch.tensor(float(x), dtype=F32)) + 0.0  # + 0.0: no -0.0 in circuits


def check_lowerable(model) -> None:
    config = model.config
    if config.residual_activation_type != "identity":
        raise UserError("circuits need residual_activation_type=identity (a ReLU on the residual stream "
                        "couples every channel)")
    if bool((model.transformer.wpe.weight != 0).any()):
        raise UserError("circuits need a zero positional embedding (OpenAI's trained models zero and freeze it)")


def circuit_from_mask(model, mask: dict, *, ablation: str = "mean", means: dict | None = None,
                      norm: str = "live", frozen_scales: dict | None = None, candidates: list[int] | None = None,
                      header: dict | None = None, dce: bool = True, fold: bool = True) -> Circuit:
    """Lower ``model`` with ``mask`` ({site: bool[width]}) to a Circuit computing ``candidates``' logits."""
    check_lowerable(model)
    if norm not in ("live", "frozen"):
        raise UserError(f"norm mode must be live or frozen, got {norm!r}")
    if norm == "frozen" and frozen_scales is None:
        raise UserError("the frozen norm mode needs the norms' scales (see circuitir.ir.ablation.norm_scales)")
    if not candidates:
        raise UserError("a circuit needs candidate tokens (the task's answers)")
    keep = {name: m.clone() for name, m in check_mask(model, mask).items()}
    fills = fills_for(model, ablation, means)
    full_header = {"ablation": {"kind": ablation}, "norm": norm, **(header or {})}
    full_header["norm"] = norm
    while True:
        circuit = _lower(model, keep, fills, norm, frozen_scales, list(candidates), full_header, fold)
        if not dce:
            return circuit
        graph = circuit.graph()
        reaching = set()
        for k in range(len(candidates)):
            reaching |= nx.ancestors(graph, Node("logits", k))
        dead = [n for n in circuit.kept_nodes() if n not in reaching]
        if not dead:
            return circuit
        for node in dead:
            keep[node.site][node.index] = False


@torch.no_grad()
def _lower(model, keep, fills, norm_mode, frozen_scales, candidates, header, fold=True) -> Circuit:
    config = model.config
    cdict = config.to_dict()
    specs = site_specs(cdict, len(candidates))
    spec_of = {s.name: s for s in specs}
    d_model, d_head = config.d_model, config.d_head
    kept = {name: set(torch.nonzero(m).flatten().tolist()) for name, m in keep.items()}
    const: dict[str, set[int]] = {name: set() for name in kept}
    blocks = model.transformer.h

    # Sites followed by AbsTopK: the top-k sees every channel.
    for spec in specs:
        if spec.topk is not None:
            const[spec.name] = set(range(spec.width)) - kept[spec.name]

    # Attention heads the circuit computes, and the constants they need.
    heads: dict[tuple[int, int], float | None] = {}
    for layer, block in enumerate(blocks):
        prefix = f"{layer}.attn"
        w_o = block.attn.c_proj.weight
        kept_writes = sorted(kept[f"{prefix}.resid_delta"])
        feeding = (w_o[kept_writes] != 0).any(0) if kept_writes else torch.zeros(w_o.shape[1], dtype=torch.bool)
        for head in range(config.n_head):
            channels = range(head * d_head, (head + 1) * d_head)
            used = any(c in kept[f"{prefix}.{p}"] for p in ("q", "k", "v") for c in channels)
            used = used or any(bool(feeding[c]) for c in channels)
            if not used:
                continue
            sink = block.attn.attn_imp
            heads[(layer, head)] = f32(sink.sink_logit[head]) if sink is not None else None
            for part in ("q", "k"):
                const[f"{prefix}.{part}"] |= set(channels) - kept[f"{prefix}.{part}"]
            const[f"{prefix}.v"] |= {c for c in channels if bool(feeding[c])} - kept[f"{prefix}.v"]

    # Tracked residual channels: read or written by kept nodes (all of them after a top-k'd write).
    tracked = set(kept["final_resid"])
    for spec in specs:
        if spec.kind in ("act_in", "resid_delta"):
            tracked |= kept[spec.name]
        if spec.kind == "resid_delta" and spec.topk is not None:
            tracked |= set(range(d_model))
    for spec in specs:
        if spec.kind == "resid_delta":
            const[spec.name] |= tracked - kept[spec.name]
    const["final_resid"] = set(range(d_model)) - kept["final_resid"]

    if not fold:
        # Unfolded: every ablated input of a kept node stays as a constant node (fold-constants folds them).
        for layer, block in enumerate(blocks):
            a, m = f"{layer}.attn", f"{layer}.mlp"
            width = config.n_head * d_head
            rows = [offset * width + c for offset, part in enumerate("qkv") for c in sorted(kept[f"{a}.{part}"])]
            for src, weight, dst_rows in ((f"{a}.act_in", block.attn.c_attn.weight, rows),
                                          (f"{m}.act_in", block.mlp.c_fc.weight, sorted(kept[f"{m}.post_act"])),
                                          (f"{m}.post_act", block.mlp.c_proj.weight,
                                           sorted(kept[f"{m}.resid_delta"]))):
                if dst_rows:
                    used = torch.nonzero((weight[dst_rows] != 0).any(0)).flatten().tolist()
                    const[src] |= set(used) - kept[src]

    def live(site):
        return kept[site] | const[site]

    circuit = Circuit(config=cdict, candidates=list(candidates), header=header)
    for site in kept:
        for index in kept[site]:
            circuit.nodes[Node(site, index)] = NodeData("kept")
        for index in const[site]:
            circuit.nodes[Node(site, index)] = NodeData("const", value=f32(fills[site][index]))
    circuit.heads = heads

    def connect(src_site, dst_site, weight, bias):
        """Edges from live src channels into kept dst channels; ablated inputs fold into the bias."""
        src_live = sorted(live(src_site))
        src_dead = sorted(set(range(weight.shape[1])) - set(src_live))
        for dst in sorted(kept[dst_site]):
            folded = bias[dst].double() if bias is not None else torch.zeros((), dtype=torch.float64)
            if src_dead:
                folded = folded + (weight[dst, src_dead].double() * fills[src_site][src_dead].double()).sum()
            circuit.nodes[Node(dst_site, dst)].bias = f32(folded)
            row = weight[dst]
            for src in src_live:
                if row[src] != 0:
                    circuit.edges[(Node(src_site, src), Node(dst_site, dst))] = f32(row[src])

    for layer, block in enumerate(blocks):
        a, m = f"{layer}.attn", f"{layer}.mlp"
        w_qkv, b_qkv = block.attn.c_attn.weight, block.attn.c_attn.bias
        width = config.n_head * d_head
        for offset, part in enumerate(("q", "k", "v")):
            rows = slice(offset * width, (offset + 1) * width)
            connect(f"{a}.act_in", f"{a}.{part}", w_qkv[rows], None if b_qkv is None else b_qkv[rows])
        connect(f"{a}.v", f"{a}.resid_delta", block.attn.c_proj.weight, block.attn.c_proj.bias)
        connect(f"{m}.act_in", f"{m}.post_act", block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        connect(f"{m}.post_act", f"{m}.resid_delta", block.mlp.c_proj.weight, block.mlp.c_proj.bias)
        for site, ln in ((f"{a}.act_in", block.ln_1), (f"{m}.act_in", block.ln_2)):
            for index in kept[site]:
                data = circuit.nodes[Node(site, index)]
                data.gain = f32(ln.weight[index])
                data.shift = f32(ln.bias[index]) if ln.bias is not None else 0.0
    # Attention v nodes feed writes through the pattern; v edges into writes of heads not computed
    # cannot exist (those heads would have been marked used).

    # Outputs: the unembedding rows of the candidates, with the final norm's gain folded into the
    # weights and its shift into the bias.
    ln_f = model.transformer.ln_f
    unembed = model.lm_head.weight[candidates]  # (K, d_model)
    for k, token in enumerate(candidates):
        bias = model.final_logits_bias[token].double()
        if ln_f.bias is not None:
            bias = bias + (unembed[k].double() * ln_f.bias.double()).sum()
        circuit.nodes[Node("logits", k)] = NodeData("output", bias=f32(bias))
        for channel in range(d_model):
            weight = f32(unembed[k, channel] * ln_f.weight[channel])
            if weight != 0.0:
                circuit.edges[(Node("final_resid", channel), Node("logits", k))] = weight

    # Embedding columns of tracked channels; per-token statistics of the untracked ones.
    wte = model.transformer.wte.weight
    # "+ 0.0" turns the -0.0 that zeroing negative weights can leave into 0.0 (same arithmetic, and
    # sparse columns then print in their sparse form).
    circuit.embed = {c: wte[:, c].to(F32) + 0.0 for c in sorted(tracked)}
    passive = sorted(set(range(d_model)) - tracked)
    running = wte[:, passive].double()  # value of each passive channel at the current read point
    for spec in specs:
        if spec.kind == "resid_delta":
            running = running + fills[spec.name][passive].double()
        if spec.kind != "act_in":
            continue
        point = spec.name.rsplit(".", 1)[0]
        layer = spec.layer
        ln = blocks[layer].ln_1 if spec.sublayer == "attn" else blocks[layer].ln_2
        if not kept[spec.name]:
            continue
        data = NormData(rms=ln.rms, eps=f32(ln.eps), width=d_model)
        if norm_mode == "frozen":
            data.frozen_scale = f32(frozen_scales[point])
        if norm_mode == "live" or not ln.rms:
            data.passive_sq = running.pow(2).sum(1).to(F32) if norm_mode == "live" else None
            data.passive_sum = running.sum(1).to(F32) if not ln.rms else None
        circuit.norms[point] = data
    final = NormData(rms=ln_f.rms, eps=f32(ln_f.eps), width=d_model)
    if norm_mode == "frozen":
        final.frozen_scale = f32(frozen_scales["final"])
    circuit.norms["final"] = final

    if model.bigram_table is not None:
        circuit.bigram = model.bigram_table[:, candidates].to(F32) + 0.0
    return circuit
