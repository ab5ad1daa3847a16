"""Export a circuit for other tools: a graph JSON and a safetensors file of its tensors.

Graph JSON (``circuitir export C.cir --format json``)
-----------------------------------------------------

Shaped like the attribution-graph files circuit-tracer writes and Neuronpedia
reads: one object with ``metadata``, ``qParams``, ``nodes`` and ``links``.

* ``metadata``: ``schema`` (``"circuitir-graph"``), ``schema_version`` (1),
  ``slug`` (task and source hash), ``scan`` (the source model file), ``task``,
  ``ablation``, ``norm``, ``source_sha256``, ``node_count`` and ``edge_count``
  (as ``circuitir`` counts them), ``candidates`` (token ids and strings where
  the tokenizer is known), and the whole ``header``; ``prompt_tokens`` and
  ``prompt`` are empty: a circuit holds at every position, not for one prompt.
* ``nodes``: one per node of the circuit, kept and constant, and one per
  output logit. ``node_id`` (and ``jsNodeId``) is the circuitir name
  (``0.mlp.post_act[17]``, ``logits[0]``); ``layer`` (a string, as
  circuit-tracer writes it; ``n_layer`` for ``final_resid`` and the logits),
  ``site``, ``sublayer`` (attn, mlp, final), ``site_kind`` (act_in, q, k, v,
  post_act, resid_delta, final_resid, logits), ``feature`` and ``index`` (the
  channel), ``ctx_idx`` (always 0: no position), ``feature_type`` (a readable
  kind: ``mlp neuron``, ``attention query``, ``residual read``, ...; ``logit``
  for outputs), ``node_kind`` (kept, const, output), ``is_target_logit``,
  ``clerp`` (the node's label where the circuit has one, else empty),
  ``bias``/``value``/``gain``/``shift`` as the circuit states them, ``head``
  for q/k/v, ``token``/``token_id`` for logits, and ``stats`` (the node's
  activation statistics on the task's held-out prompts: ``mean``, ``std``,
  ``max_abs`` over all real positions, ``last_mean`` at the predicted position)
  when a model is given, else null.
* ``links``: ``source``, ``target``, ``weight`` and ``kind``: ``weight`` (a
  nonzero weight of the model between two nodes) or ``residual`` (a write of
  residual channel c read later as channel c, weight 1).

safetensors (``--format safetensors``)
--------------------------------------

Every tensor of the circuit, with the node names and the header in the
file's string metadata (``circuitir`` = JSON of nodes, heads, norms, header,
config, candidates): ``nodes.index``/``bias``/``value``/``gain``/``shift``
(one row per node in ``nodes`` order), ``edges.src``/``edges.dst`` (indices
into that order) and ``edges.weight``, ``embed.channels`` and ``embed``
(channels × vocab), ``heads.layer``/``head``/``sink`` (NaN: no sink),
``norms.{name}.passive_sq``/``passive_sum``, ``bigram``.
"""

from __future__ import annotations

import json
import math

import torch

from circuitir.errors import UserError

GRAPH_SCHEMA = "circuitir-graph"
GRAPH_SCHEMA_VERSION = 1

FEATURE_TYPES = {
    "act_in": "residual read", "q": "attention query", "k": "attention key", "v": "attention value",
    "post_act": "mlp neuron", "resid_delta": "residual write", "final_resid": "residual read",
    "logits": "logit",
}


def _finite(x: float | None):
    """JSON has no NaN or infinity: those become null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, torch.Tensor):
        return _plain(obj.tolist())
    return obj


def node_statistics(circuit, loaded, task, n: int = 128, seed: int = 0) -> dict:
    """Per node of the circuit: activation statistics in the full model on the task's held-out prompts."""
    from circuitir.ir.ablation import record_sites
    from circuitir.tasks.evaluate import encode_examples

    batch = encode_examples(task, task.examples("heldout", n, seed), loaded.tokenizer, loaded.config.block_size)
    with torch.no_grad():
        recorded = record_sites(loaded.model, batch.tokens)
    length = batch.tokens.shape[1]
    real = (torch.arange(length)[None, :] <= batch.last[:, None]).flatten()
    last = torch.zeros(len(batch), length, dtype=torch.bool)
    last[torch.arange(len(batch)), batch.last] = True
    last = last.flatten()
    out = {}
    for node in circuit.nodes:
        if node.site not in recorded:
            continue
        values = recorded[node.site][:, node.index].double()
        valid = values[real]
        out[node] = {"mean": float(valid.mean()), "std": float(valid.std(unbiased=False)),
                     "max_abs": float(valid.abs().max()), "last_mean": float(values[last].mean()),
                     "prompts": len(batch)}
    return out


def graph_json(circuit, tokenizer=None, stats: dict | None = None) -> dict:
    """The circuit as a circuit-tracer/Neuronpedia-shaped graph (module docstring)."""
    from circuitir.ir.circuit import site_specs

    specs = {s.name: s for s in site_specs(circuit.config, len(circuit.candidates))}
    labels = getattr(circuit, "labels", None) or {}
    d_head = circuit.config["d_head"]
    provenance = circuit.provenance

    def token_text(token: int):
        if tokenizer is None:
            return None
        try:
            return tokenizer.token_str(int(token))
        except Exception:  # a token this tokenizer cannot decode alone
            return None

    nodes = []
    for node in circuit.sorted(list(circuit.nodes)):
        data, spec = circuit.nodes[node], specs[node.site]
        row = {"node_id": str(node), "jsNodeId": str(node), "feature": node.index, "index": node.index,
               "layer": str(spec.layer), "site": node.site, "sublayer": spec.sublayer, "site_kind": spec.kind,
               "ctx_idx": 0, "feature_type": FEATURE_TYPES[spec.kind], "node_kind": data.kind,
               "is_target_logit": spec.kind == "logits", "clerp": labels.get(node, labels.get(str(node), "")),
               "bias": _finite(data.bias), "value": _finite(data.value), "gain": _finite(data.gain),
               "shift": _finite(data.shift), "stats": None}
        if spec.kind in ("q", "k", "v"):
            row["head"] = node.index // d_head
        if spec.kind == "logits":
            token = circuit.candidates[node.index]
            row["token_id"] = int(token)
            row["token"] = token_text(token)
        if stats and node in stats:
            row["stats"] = {k: _finite(v) if isinstance(v, float) else v for k, v in stats[node].items()}
        nodes.append(row)
    links = [{"source": str(src), "target": str(dst), "weight": _finite(w), "kind": "weight"}
             for (src, dst), w in sorted(circuit.edges.items(), key=lambda e: (str(e[0][0]), str(e[0][1])))]
    for src, dst, data in circuit.graph().edges(data=True):
        if data["kind"] == "residual":
            links.append({"source": str(src), "target": str(dst), "weight": 1.0, "kind": "residual"})
    sha = provenance.model_sha256 or ""
    metadata = {
        "schema": GRAPH_SCHEMA, "schema_version": GRAPH_SCHEMA_VERSION,
        "slug": f"{provenance.task or 'circuit'}-{sha[:12]}".replace(":", "-").replace("@", "-"),
        "scan": provenance.model_file, "prompt_tokens": [], "prompt": "",
        "task": provenance.task, "ablation": _plain(circuit.header.get("ablation")), "norm": circuit.norm_mode,
        "source_sha256": provenance.model_sha256, "node_count": circuit.n_nodes, "edge_count": circuit.n_edges,
        "candidates": [{"token_id": int(t), "token": token_text(t)} for t in circuit.candidates],
        "config": _plain(circuit.config), "header": _plain(circuit.header),
    }
    return {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                                              "clickedId": "", "sparsityThreshold": None},
            "nodes": nodes, "links": links}


def circuit_tensors(circuit) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) for a safetensors file of the circuit (module docstring)."""
    order = circuit.sorted(list(circuit.nodes))
    position = {node: i for i, node in enumerate(order)}
    data = [circuit.nodes[n] for n in order]
    tensors = {
        "nodes.index": torch.tensor([n.index for n in order], dtype=torch.int64),
        "nodes.bias": torch.tensor([d.bias for d in data], dtype=torch.float32),
        "nodes.value": torch.tensor([d.value for d in data], dtype=torch.float32),
        "nodes.gain": torch.tensor([d.gain for d in data], dtype=torch.float32),
        "nodes.shift": torch.tensor([d.shift for d in data], dtype=torch.float32),
    }
    edges = sorted(circuit.edges.items(), key=lambda e: (position[e[0][0]], position[e[0][1]]))
    tensors["edges.src"] = torch.tensor([position[s] for (s, _), _ in edges], dtype=torch.int64)
    tensors["edges.dst"] = torch.tensor([position[d] for (_, d), _ in edges], dtype=torch.int64)
    tensors["edges.weight"] = torch.tensor([w for _, w in edges], dtype=torch.float32)
    channels = sorted(circuit.embed)
    tensors["embed.channels"] = torch.tensor(channels, dtype=torch.int64)
    vocab = circuit.config["vocab_size"]
    tensors["embed"] = (torch.stack([circuit.embed[c].float().flatten() for c in channels]) if channels
                        else torch.zeros(0, vocab))
    heads = sorted(circuit.heads)
    tensors["heads.layer"] = torch.tensor([layer for layer, _ in heads], dtype=torch.int64)
    tensors["heads.head"] = torch.tensor([head for _, head in heads], dtype=torch.int64)
    tensors["heads.sink"] = torch.tensor([float("nan") if circuit.heads[h] is None else circuit.heads[h]
                                          for h in heads], dtype=torch.float32)
    norms = {}
    for name, norm in sorted(circuit.norms.items()):
        norms[name] = {"rms": norm.rms, "eps": norm.eps, "width": norm.width, "frozen_scale": norm.frozen_scale}
        for table in ("passive_sq", "passive_sum"):
            value = getattr(norm, table)
            if value is not None:
                tensors[f"norms.{name}.{table}"] = value.float().contiguous()
    if circuit.bigram is not None:
        tensors["bigram"] = circuit.bigram.float().contiguous()
    meta = {"nodes": [str(n) for n in order], "kinds": [d.kind for d in data], "heads": [list(h) for h in heads],
            "norms": norms, "candidates": [int(t) for t in circuit.candidates], "config": circuit.config,
            "header": circuit.header}
    return {k: v.contiguous() for k, v in tensors.items()}, {"format": "circuitir-circuit",
                                                             "circuitir": json.dumps(_plain(meta))}


def save_circuit_safetensors(circuit, path) -> None:
    from circuitir.models.checkpoint import atomic_path
    save_file = _safetensors_save()
    tensors, metadata = circuit_tensors(circuit)
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)


def _safetensors_save():
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("the safetensors package is needed for --format safetensors (pip install safetensors)") \
            from None
    return save_file
