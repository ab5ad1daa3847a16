"""Lowering: a model and a node mask to a Circuit IR.

The circuit computes exactly what the model computes with every channel
outside the mask ablated, while keeping only what that needs:

* A kept node keeps its nonzero incoming weights from *live* nodes (kept, or
  constant).
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

``lower`` emits this *unfolded*: every ablated input of a kept node is a
``const`` node. Folding constants into biases and dropping what does not
reach the logits are the ``fold-constants`` and ``dce`` passes
(``passes/circuit_passes.py``), the only implementations of either;
``circuit_from_mask`` (``Circuit.from_mask``) is lower -> fold -> dce, the
same functions the pipeline runs. Which matrix reads and writes which site is
the topology table's (``ir/topology.py``).
"""

from __future__ import annotations

import torch

from circuitir.errors import UserError
from circuitir.ir.ablation import check_mask, fills_for
from circuitir.ir.masked import graph_of
from circuitir.ir.trace import GraphIR
from circuitir.ir.circuit import Circuit, Node, NodeData, NormData, site_specs
from circuitir.ir.topology import MATRICES, SITES, site_name

F32 = torch.float32


def f32(x) -> float:
    """A Python float that is exactly a float32 (so text round-trips are exact)."""
    return float(torch.tensor(float(x), dtype=F32)) + 0.0  # + 0.0: no -0.0 in circuits


def check_lowerable(graph_ir: GraphIR) -> None:
    config, model = graph_ir.config, graph_ir.graph_module
    if config.residual_activation_type != "identity":
        raise UserError("circuits need residual_activation_type=identity (a ReLU on the residual stream "
                        "couples every channel)")
    if bool((model.transformer.wpe.weight != 0).any()):
        raise UserError("circuits need a zero positional embedding (OpenAI's trained models zero and freeze it)")


def circuit_from_mask(model, mask: dict, *, ablation: str = "mean", means: dict | None = None,
                      norm: str = "live", frozen_scales: dict | None = None, candidates: list[int] | None = None,
                      header: dict | None = None) -> Circuit:
    """``model`` with ``mask`` ({site: bool[width]}) as a Circuit computing ``candidates``' logits:
    lower, then the fold-constants and dce passes' own functions, exactly what the pipeline runs."""
    from circuitir.passes.circuit_passes import eliminate_dead_code, fold_constants
    graph_ir = graph_of(model)
    keep = check_mask(graph_ir, mask)
    fills = fills_for(graph_ir, ablation, means)
    full_header = {"ablation": {"kind": ablation}, **(header or {}), "norm": norm}
    circuit = lower(graph_ir, keep, fills, norm=norm, frozen_scales=frozen_scales, candidates=candidates,
                    header=full_header)
    return eliminate_dead_code(fold_constants(circuit), fills)


@torch.no_grad()
def lower(model_or_graph, keep: dict, fills: dict, *, norm: str = "live", frozen_scales: dict | None = None,
          candidates: list[int] | None = None, header: dict | None = None) -> Circuit:
    """Unfolded Circuit IR: every kept node with its nonzero weights from live nodes, and every ablated
    input of a kept node as a ``const`` node (fold-constants folds what can be folded; dce drops what
    does not reach the logits). The weights are read off the traced GraphModule (``trace``'s output;
    a model is traced first), which shares them with the model."""
    graph_ir = graph_of(model_or_graph)
    check_lowerable(graph_ir)
    if norm not in ("live", "frozen"):
        raise UserError(f"norm mode must be live or frozen, got {norm!r}")
    if norm == "frozen" and frozen_scales is None:
        raise UserError("the frozen norm mode needs the norms' scales (see circuitir.ir.ablation.norm_scales)")
    if not candidates:
        raise UserError("a circuit needs candidate tokens (the task's answers)")
    keep = {name: torch.as_tensor(m, dtype=torch.bool).clone() for name, m in check_mask(graph_ir, keep).items()}
    # The norm mode decides which dependencies the circuit's graph has (a live norm couples every channel
    # it reads), so the circuit states it from the start.
    return _lower(graph_ir, keep, fills, norm, frozen_scales, list(candidates), {**(header or {}), "norm": norm})


@torch.no_grad()
def _lower(graph_ir, keep, fills, norm_mode, frozen_scales, candidates, header) -> Circuit:
    config, model = graph_ir.config, graph_ir.graph_module
    cdict = config.to_dict()
    specs = site_specs(cdict, len(candidates))
    d_model, d_head = config.d_model, config.d_head
    kept = {name: set(torch.nonzero(m).flatten().tolist()) for name, m in keep.items()}
    const: dict[str, set[int]] = {name: set() for name in kept}
    blocks = [model.get_submodule(f"transformer.h.{layer}") for layer in range(config.n_layer)]

    # Sites followed by AbsTopK: the top-k sees every channel.
    for spec in specs:
        if spec.topk is not None:
            const[spec.name] = set(range(spec.width)) - kept[spec.name]

    # Attention heads the circuit computes, and the constants they need: a head is computed when one of
    # its q/k/v channels is kept or one of its v channels feeds a kept write (through the patterns).
    heads: dict[tuple[int, int], float | None] = {}
    through_heads = [m for m in MATRICES if m.via == "heads"]
    for layer, block in enumerate(blocks):
        for matrix in through_heads:
            src, dst = site_name(layer, matrix.sublayer, matrix.src), site_name(layer, matrix.sublayer, matrix.dst)
            weight, _ = matrix.weight(block)
            kept_rows = sorted(kept[dst])
            feeding = (weight[kept_rows] != 0).any(0) if kept_rows else torch.zeros(weight.shape[1], dtype=torch.bool)
            prefix = src.rsplit(".", 1)[0]
            for head in range(config.n_head):
                channels = range(head * d_head, (head + 1) * d_head)
                used = any(c in kept[f"{prefix}.{p}"] for p in ("q", "k", "v") for c in channels)
                used = used or any(bool(feeding[c]) for c in channels)
                if not used:
                    continue
                sink = getattr(block.attn, "attn_imp", None)
                heads[(layer, head)] = f32(sink.sink_logit[head]) if sink is not None else None
                for part in ("q", "k"):
                    const[f"{prefix}.{part}"] |= set(channels) - kept[f"{prefix}.{part}"]
                const[src] |= {c for c in channels if bool(feeding[c])} - kept[src]

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

    # Every ablated input of a kept node stays as a constant node (fold-constants folds them).
    for layer, block in enumerate(blocks):
        for matrix in MATRICES:
            if matrix.via == "heads":
                continue  # the v channels a computed head carries are constants already (above)
            src, dst = site_name(layer, matrix.sublayer, matrix.src), site_name(layer, matrix.sublayer, matrix.dst)
            weight, _ = matrix.weight(block)
            rows = sorted(kept[dst])
            if rows:
                used = torch.nonzero((weight[rows] != 0).any(0)).flatten().tolist()
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
        """Edges from live src channels into kept dst channels (every nonzero input is live: kept or const)."""
        src_live = sorted(live(src_site))
        for dst in sorted(kept[dst_site]):
            circuit.nodes[Node(dst_site, dst)].bias = f32(bias[dst]) if bias is not None else 0.0
            row = weight[dst]
            for src in src_live:
                if row[src] != 0:
                    circuit.edges[(Node(src_site, src), Node(dst_site, dst))] = f32(row[src])

    for layer, block in enumerate(blocks):
        for matrix in MATRICES:
            connect(site_name(layer, matrix.sublayer, matrix.src), site_name(layer, matrix.sublayer, matrix.dst),
                    *matrix.weight(block))
        for rule in SITES:
            if rule.norm is None:
                continue
            norm = getattr(block, rule.norm)
            site = site_name(layer, rule.sublayer, rule.kind)
            for index in kept[site]:
                data = circuit.nodes[Node(site, index)]
                data.gain = f32(norm.weight[index])
                data.shift = f32(norm.bias[index]) if norm.bias is not None else 0.0

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
    circuit.embed = {c: wte[:, c].to(F32).cpu() + 0.0 for c in sorted(tracked)}
    passive = sorted(set(range(d_model)) - tracked)
    norm_of = {(rule.sublayer, rule.kind): rule.norm for rule in SITES if rule.norm}
    running = wte[:, passive].double()  # value of each passive channel at the current read point
    for spec in specs:
        if spec.kind == "resid_delta":
            running = running + fills[spec.name][passive].double().to(running.device)
        if spec.kind != "act_in" or not kept[spec.name]:
            continue
        point = spec.name.rsplit(".", 1)[0]
        ln = getattr(blocks[spec.layer], norm_of[(spec.sublayer, spec.kind)])
        data = NormData(rms=ln.rms, eps=f32(ln.eps), width=d_model)
        if norm_mode == "frozen":
            data.frozen_scale = f32(frozen_scales[point])
        if norm_mode == "live" or not ln.rms:
            data.passive_sq = running.pow(2).sum(1).to(F32).cpu() if norm_mode == "live" else None
            data.passive_sum = running.sum(1).to(F32).cpu() if not ln.rms else None
        circuit.norms[point] = data
    final = NormData(rms=ln_f.rms, eps=f32(ln_f.eps), width=d_model)
    if norm_mode == "frozen":
        final.frozen_scale = f32(frozen_scales["final"])
    circuit.norms["final"] = final

    if getattr(model, "bigram_table", None) is not None:
        circuit.bigram = model.bigram_table[:, candidates].to(F32).cpu() + 0.0
    return circuit
