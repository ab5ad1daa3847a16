"""Using bridges: evaluate them, steer the dense model through them, explain it with a circuit.

* :func:`bridge_eval`: per boundary, NMSE of the encoder and the decoder, the KL of
  both hybrid graphs (``ir/bridge.py``) to the dense logits, their pretraining loss
  and task loss, beside the dense and sparse models' own.
* :func:`steer`: the paper's A.4 intervention. For a sparse read channel ``c`` at
  boundary ``i`` (a ``{L}.attn.act_in``/``{L}.mlp.act_in``/``final_resid`` node),
  at every token take Δa = a_c(counterfactual) − a_c(actual), the counterfactual
  from the prompt's contrast partner (same length, the other answer). Δa is a
  change of the sparse model's *post-norm* read; back in its residual stream it
  is Δa·rms_s/g_s[c]; through the decoder row it is Δa·rms_s/g_s[c]·W_dec[:, c];
  read through the dense norm it is that ·g_d/rms_d, i.e. rescaled by the ratio
  of residual RMS (rms_s/rms_d, measured per token on the actual prompt) and the
  two norms' gains. ``strength`` times this is added to the dense model's
  post-norm read at boundary ``i`` by a graph rewrite (a node after the norm
  node of a copy of the dense graph). With ``into="residual"`` the change goes
  into the dense residual stream instead, read by every later sublayer: the
  sparse residual's channels moved to the partner's, through the decoder
  columns, which is what the sparse→dense hybrid at ``i`` would see. The channels
  are one node's, a circuit's at a boundary, or every one at a boundary (what the
  bridge can carry at all). The baseline adds one random direction (fixed seed)
  with the same per-token norm, at the same place.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from circuitir.errors import UserError
from circuitir.ir.bridge import hybrid, residual_node, residuals
from circuitir.ir.masked import _copy, device_of
from circuitir.ir.trace import trace
from circuitir.models.bridges import kl_divergence, load_bridged, nmse
from circuitir.tasks.evaluate import binary_loss, candidate_logits, encode_examples


class _WithConfig(torch.nn.Module):
    """A graph module with the ``config`` that task evaluation reads (block size)."""

    def __init__(self, graph_module, config):
        super().__init__()
        self.graph_module, self.config = graph_module, config

    def forward(self, idx):
        return self.graph_module(idx)


def validation_windows(loaded, windows: int = 32) -> torch.Tensor:
    """(windows, block+1) evenly spaced windows of the validation split of the model's corpus."""
    from circuitir.data.corpus import load_corpus
    corpus = load_corpus((loaded.meta.get("recipe") or {}).get("corpus"), loaded.tokenizer)
    block = loaded.config.block_size
    tokens = corpus.validation.long()
    starts = torch.linspace(0, len(tokens) - block - 2, windows).long()
    return torch.stack([tokens[s:s + block + 1] for s in starts])


def load_models(bridged_path, dense_path, device=None) -> tuple:
    """(dense LoadedModel, sparse LoadedModel, Bridges), each moved once to ``device`` (``--device``; None
    leaves them on the CPU). Everything computed from them is made on their device and comes back as
    Python numbers."""
    from circuitir.models.checkpoint import load_model
    dense = load_model(dense_path)
    sparse, bridges = load_bridged(bridged_path, dense)
    if device is not None:
        from circuitir.models.device import resolve_device
        where = resolve_device(device)
        for module in (dense.model, sparse.model, bridges):
            module.to(where)
    return dense, sparse, bridges


def _lm_loss(logits, targets) -> float:
    return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def _task_loss(model, task, tokenizer, n: int, seed: int = 0) -> float:
    from circuitir.tasks.evaluate import evaluate_model
    return evaluate_model(model, task, tokenizer, "heldout", n, seed)["loss"]


@torch.no_grad()
def bridge_eval(bridged_path, dense_path, task: str | None = None, n: int = 256, windows: int = 32,
                device=None) -> dict:
    from circuitir.tasks import check_task_tokens, get_task
    dense, sparse, bridges = load_models(bridged_path, dense_path, device)
    task_obj = get_task(task) if task else None
    check_task_tokens([task_obj] if task_obj else [], dense.tokenizer)
    dense_ir, sparse_ir = trace(dense.model), trace(sparse.model)
    batch = validation_windows(dense, windows).to(device_of(dense.model))
    idx, targets = batch[:, :-1], batch[:, 1:]
    dense_logits, dense_h = residuals(dense_ir)(idx)
    sparse_logits, sparse_h = residuals(sparse_ir)(idx)
    out = {"dense": {"lm_loss": _lm_loss(dense_logits, targets)},
           "sparse": {"lm_loss": _lm_loss(sparse_logits, targets), "kl": float(kl_divergence(dense_logits,
                                                                                             sparse_logits))},
           "boundaries": [], "task": task_obj.name if task_obj else None, "windows": windows}
    if task_obj:
        out["dense"]["task_loss"] = _task_loss(dense.model, task_obj, dense.tokenizer, n)
        out["sparse"]["task_loss"] = _task_loss(sparse.model, task_obj, dense.tokenizer, n)
    # The paper's bar for a hybrid: its loss closer to the dense model's than the sparse model's is.
    gap = abs(out["sparse"]["lm_loss"] - out["dense"]["lm_loss"])
    for point in bridges.points:
        d2s = hybrid(dense_ir, sparse_ir, point, bridges.encoder(point))
        s2d = hybrid(sparse_ir, dense_ir, point, bridges.decoder(point))
        d2s_logits, s2d_logits = d2s(idx), s2d(idx)
        row = {"boundary": point,
               "nmse_enc": float(nmse(bridges.encoder(point)(dense_h[point]), sparse_h[point])),
               "nmse_dec": float(nmse(bridges.decoder(point)(sparse_h[point]), dense_h[point])),
               "kl_d2s": float(kl_divergence(dense_logits, d2s_logits)),
               "kl_s2d": float(kl_divergence(dense_logits, s2d_logits)),
               "lm_loss_d2s": _lm_loss(d2s_logits, targets), "lm_loss_s2d": _lm_loss(s2d_logits, targets)}
        for way in ("d2s", "s2d"):
            row[f"closer_{way}"] = abs(row[f"lm_loss_{way}"] - out["dense"]["lm_loss"]) < gap
        if task_obj:
            row["task_loss_d2s"] = _task_loss(_WithConfig(d2s, sparse.config), task_obj, dense.tokenizer, n)
            row["task_loss_s2d"] = _task_loss(_WithConfig(s2d, dense.config), task_obj, dense.tokenizer, n)
        out["boundaries"].append(row)
    return out


# ---------------------------------------------------------------- steering

def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise UserError(f"--strength: cannot parse {text!r} (expected numbers separated by commas, "
                        "e.g. 0,0.25,0.5,0.75,1)") from None
    if not values or any(v != v or abs(v) == float("inf") for v in values):
        raise UserError(f"--strength: cannot parse {text!r} (expected finite numbers separated by commas)")
    return values


def boundary_of(site: str, config) -> str:
    """The boundary a read site belongs to: ``{L}.attn.act_in`` -> ``{L}.attn``, ``final_resid`` -> ``final``."""
    if site == "final_resid":
        return "final"
    parts = site.split(".")
    if len(parts) == 3 and parts[2] == "act_in" and parts[1] in ("attn", "mlp") and parts[0].isdigit():
        if int(parts[0]) < config.n_layer:
            return f"{parts[0]}.{parts[1]}"
    raise UserError(f"node site {site!r} is not a residual read at a bridge boundary (use "
                    f"{{L}}.attn.act_in[c], {{L}}.mlp.act_in[c] or final_resid[c])")


def circuit_reads(circuit, config) -> dict[str, list[int]]:
    """A circuit's residual-read channels, by bridge boundary (sorted; other nodes left out)."""
    reads: dict[str, set[int]] = {}
    for kept in circuit.kept_nodes():
        try:
            reads.setdefault(boundary_of(kept.site, config), set()).add(kept.index)
        except UserError:  # not a residual read
            continue
    return {point: sorted(channels) for point, channels in reads.items()}


def steering_label(result: dict) -> str:
    """What a steering result moved, in words: 'channel 37', 'the circuit's 23 channels', 'all 128 channels'."""
    channels, selection = result["channels"], result["selection"]
    if selection == "boundary":
        what = f"all {len(channels)} channels"
    elif selection == "circuit":
        what = f"the circuit's {len(channels)} channel{'s' * (len(channels) != 1)}"
    else:
        what = f"channel {channels[0]}" if len(channels) == 1 else f"channels {channels}"
    return f"{what} at {result['boundary']} (into the {result['into']})"


def parse_channel(text: str, config) -> tuple[str, int]:
    from circuitir.ir.circuit import parse_node
    try:
        node = parse_node(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    point = boundary_of(node.site, config)
    if not 0 <= node.index < config.d_model:
        raise UserError(f"node {text}: channel {node.index} out of range (the sparse residual has "
                        f"{config.d_model} channels)")
    return point, node.index


def contrast_pairs(task, n: int, seed: int = 0, split: str = "heldout") -> list[tuple]:
    """(example, partner) pairs: each prompt of ``split`` with its generated contrast partner of the
    same token length (the partner's answer is the example's alternative); a task file pairs its own
    lines (:meth:`~circuitir.tasks.task_file.FileTask.contrast_pairs`)."""
    out = task.contrast_pairs(split, n) if hasattr(task, "contrast_pairs") else _generated_pairs(task, n, seed,
                                                                                                   split)
    if not out:
        raise UserError(f"task {task.name}: no contrast pairs of equal length to steer with (a task file needs "
                        "lines whose answers are each other's swapped, with prompts of the same length)")
    return out[:n]


def _generated_pairs(task, n: int, seed: int, split: str) -> list[tuple]:
    from circuitir.tasks import split_of
    rng = random.Random(f"{task.name}:steer:{seed}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) >= n:
            break
        a, b = task.make_pair(rng)
        for x, y in ((a, b), (b, a)):
            if x.prompt in seen or split_of(x.prompt) != split or len(x.prompt) != len(y.prompt):
                continue
            seen.add(x.prompt)
            out.append((x, y))
    return out


def add_steering(x: torch.Tensor, delta: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    return x + strength * delta


INTO = ("read", "residual")


def steered_graph(dense_ir, point: str, delta: torch.Tensor, into: str = "read"):
    """A copy of the dense graph adding ``strength * delta`` at ``point``: to the post-norm read there (only the
    sublayer at ``point`` sees it), or with ``into="residual"`` to the residual stream (every later sublayer and
    the unembedding see it, as in the sparse→dense hybrid)."""
    module = _copy(dense_ir, class_name="SteeredGraph")
    if into == "residual":
        node = residual_node(module, dense_ir, point)
    else:
        norm_path = dense_ir.norms[point]
        node = next(n for n in module.graph.nodes if n.op == "call_module" and n.target == norm_path)
    module.register_buffer("steer_delta", delta)
    module.register_buffer("steer_strength", torch.zeros(()))
    graph = module.graph
    with graph.inserting_before(node):
        d, s = graph.get_attr("steer_delta"), graph.get_attr("steer_strength")
    with graph.inserting_after(node):
        new = graph.call_function(add_steering, (node, d, s))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    graph.lint()
    module.recompile()
    return module


@torch.no_grad()
def steer(bridged_path, dense_path, task: str, node: str | None, strengths: list[float],
          circuit_path: str | None = None, n: int = 64, seed: int = 0, device=None,
          boundary: str | None = None, into: str = "read") -> dict:
    """Steer the dense model along sparse read channels decoded through the bridge (PAPER A.4): one channel
    (``node``), a circuit's channels at a boundary (``circuit_path``; the first boundary it has channels at,
    or ``boundary``), or, with ``boundary`` alone, every channel there: what the bridge carries at all.
    ``into``: the decoded change is added to the dense read at the boundary (the issue's reading of A.4) or to
    the dense residual stream there (:func:`steered_graph`); the random baseline gets the same treatment."""
    if into not in INTO:
        raise UserError(f"--into {into}: use one of {', '.join(INTO)}")
    from circuitir.tasks import check_task_tokens, get_task
    dense, sparse, bridges = load_models(bridged_path, dense_path, device)
    task_obj = get_task(task)
    check_task_tokens([task_obj], dense.tokenizer)
    if node is None and circuit_path is None and boundary is None:
        raise UserError("give --node SITE[c], --circuit C.cir or --boundary B")
    if node is not None and circuit_path is not None:
        raise UserError("give --node or --circuit, not both (--boundary picks the circuit's boundary)")
    if boundary is not None and boundary not in bridges.points:
        raise UserError(f"--boundary {boundary}: not a bridge boundary (one of {', '.join(bridges.points)})")
    if node is not None:
        selection = "node"
        point, channel = parse_channel(node, sparse.config)
        channels = [channel]
        if boundary is not None and boundary != point:
            raise UserError(f"--node {node} is at boundary {point}, not --boundary {boundary}")
    elif circuit_path is not None:
        from circuitir.api import load
        selection = "circuit"
        reads = circuit_reads(load(circuit_path), sparse.config)
        if not reads:
            raise UserError(f"{circuit_path}: the circuit has no residual-read channel at a bridge boundary")
        point = boundary if boundary is not None else next(p for p in bridges.points if p in reads)
        if point not in reads:
            raise UserError(f"{circuit_path}: the circuit has no channel at boundary {point} (it has some at "
                            f"{', '.join(p for p in bridges.points if p in reads)})")
        channels = reads[point]
    else:
        selection = "boundary"
        point, channels = boundary, list(range(sparse.config.d_model))
    if point not in bridges.points:
        raise UserError(f"boundary {point} has no bridge in {bridged_path}")
    pairs = contrast_pairs(task_obj, n, seed)
    tok = dense.tokenizer
    actual = encode_examples(task_obj, [a for a, _ in pairs], tok, dense.config.block_size)
    counter = encode_examples(task_obj, [b for _, b in pairs], tok, dense.config.block_size)
    where = device_of(dense.model)
    tokens, last = actual.tokens.to(where), actual.last.to(where)
    correct, alternative = actual.correct.to(where), actual.alternative.to(where)
    dense_ir, sparse_ir = trace(dense.model), trace(sparse.model)
    _, sparse_h = residuals(sparse_ir)(tokens)
    _, sparse_h_cf = residuals(sparse_ir)(counter.tokens.to(where))
    _, dense_h = residuals(dense_ir)(tokens)
    s_norm, d_norm = sparse.model.norms()[point], dense.model.norms()[point]
    cols = torch.tensor(channels, device=where)
    valid = (torch.arange(tokens.shape[1], device=where)[None, :] <= last[:, None]).float()[..., None]
    w_dec = bridges.decoder(point).weight[:, cols]
    if into == "residual":
        # The sparse residual's channels moved to the partner's, decoded: the change the sparse->dense hybrid at
        # this boundary would see.
        delta = ((sparse_h_cf[point][..., cols] - sparse_h[point][..., cols]) * valid) @ w_dec.T  # (N, T, d_dense)
    else:
        reads_actual, reads_cf = s_norm(sparse_h[point]), s_norm(sparse_h_cf[point])
        delta_act = (reads_cf[..., cols] - reads_actual[..., cols]) * valid       # (N, T, C); padding: no change
        rms_ratio = s_norm.inverse_scale(sparse_h[point]).reciprocal() * d_norm.inverse_scale(dense_h[point])
        back = delta_act / s_norm.weight[cols]                                     # Δ sparse residual / rms_s
        delta = (back @ w_dec.T) * rms_ratio * d_norm.weight                       # (N, T, d_dense)
    generator = torch.Generator().manual_seed(seed + 12345)
    direction = torch.randn(delta.shape[-1], generator=generator).to(where)  # drawn on the CPU: same on any device
    direction = direction / direction.norm()
    random_delta = direction * delta.norm(dim=-1, keepdim=True)
    rows = {}
    for name, d in (("bridge", delta), ("random", random_delta)):
        graph = steered_graph(dense_ir, point, d, into)
        rows[name] = []
        for strength in strengths:
            graph.steer_strength.fill_(strength)
            at_last = graph(tokens)[torch.arange(len(pairs), device=where), last].float().softmax(-1)
            p_correct = at_last.gather(-1, correct[:, None])[:, 0]
            p_other = at_last.gather(-1, alternative[:, None])[:, 0]
            rows[name].append({"strength": strength, "p_correct": float(p_correct.mean()),
                               "p_other": float(p_other.mean()),
                               "other_wins": float((p_other > p_correct).float().mean())})
    result = {"task": task_obj.name, "boundary": point, "into": into, "selection": selection,
              "channels": channels, "n": len(pairs),
              "strengths": strengths, "bridge": rows["bridge"], "random": rows["random"],
              "mean_delta_norm": float(delta.norm(dim=-1).sum() / valid.sum())}
    for name in ("bridge", "random"):
        p = [r["p_other"] for r in rows[name]]
        result[f"{name}_p_other_change"] = p[-1] - p[0]
        result[f"{name}_monotonic"] = all(b >= a for a, b in zip(p, p[1:])) or all(b <= a for a, b in zip(p, p[1:]))
    return result


def plot_steering(result: dict, path) -> None:
    from circuitir.render.plots import save_figure, subplots

    fig, ax = subplots(figsize=(5.5, 3.8))
    s = result["strengths"]
    for name, style, color in (("bridge", "-o", "tab:blue"), ("random", "--s", "tab:gray")):
        ax.plot(s, [r["p_other"] for r in result[name]], style, color=color, label=f"{name}: P(other answer)")
        ax.plot(s, [r["p_correct"] for r in result[name]], style, color=color, alpha=0.4,
                label=f"{name}: P(actual answer)")
    ax.set_xlabel("steering strength")
    ax.set_ylabel("dense model probability")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['task']}, {result['n']} held-out prompts\nsteering {steering_label(result)}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


@torch.no_grad()
def contrast_channels(sparse_model, task, point: str, channels: list[int] | None = None, n: int = 128,
                      seed: int = 0) -> list[dict]:
    """Rank the sparse read channels at ``point`` by how much they separate each prompt from its contrast
    partner at the last token: |mean Δa| / std(a) (a "which answer" channel scores high)."""
    from circuitir.models.tokenizer import ByteTokenizer
    pairs = contrast_pairs(task, n, seed, split="train")
    tok = ByteTokenizer()
    actual = encode_examples(task, [a for a, _ in pairs], tok, sparse_model.config.block_size)
    counter = encode_examples(task, [b for _, b in pairs], tok, sparse_model.config.block_size)
    ir = trace(sparse_model)
    norm = sparse_model.norms()[point]
    where = device_of(sparse_model)
    rows = torch.arange(len(pairs), device=where)
    reads = norm(residuals(ir)(actual.tokens.to(where))[1][point])[rows, actual.last.to(where)]
    reads_cf = norm(residuals(ir)(counter.tokens.to(where))[1][point])[rows, counter.last.to(where)]
    # orient by the answer: + when the prompt's answer is the first candidate's token
    sign = torch.where(actual.correct == actual.correct[0], 1.0, -1.0)[:, None].to(where)
    score = ((reads_cf - reads) * sign).mean(0).abs() / reads.std(0).clamp_min(1e-6)
    chosen = channels if channels is not None else range(reads.shape[-1])
    ranked = sorted(({"channel": c, "score": float(score[c])} for c in chosen), key=lambda r: -r["score"])
    return ranked


# ---------------------------------------------------------------- explaining the dense model

@torch.no_grad()
def explain(bridged_path, dense_path, circuit_path, n: int = 256, seed: int = 0, device=None) -> dict:
    """What a circuit of the bridged sparse model says about the dense model, per boundary.

    The sparse model masked to the circuit (``ir/masked.py``: every other channel takes the circuit's
    declared ablation values) runs up to boundary i; the decoder maps its residual stream into the dense
    model, whose suffix predicts. On held-out prompts: ``agreement`` = fraction of prompts where the
    dense model and this circuit->dense hybrid prefer the same candidate; ``task_loss`` of that hybrid;
    and ``ablated_task_loss``: the circuit's channels ablated instead (everything else kept), decoded
    the same way, with ``ablation_change`` = ablated minus the un-ablated sparse->dense hybrid's loss."""
    from circuitir.api import load
    from circuitir.ir.ablation import fills_for
    from circuitir.ir.masked import mask_graph
    from circuitir.ir.trace import GraphIR
    from circuitir.passes.ablate import declared_means
    from circuitir.runtime.check import circuit_mask, complement
    from circuitir.tasks import get_task
    dense, sparse, bridges = load_models(bridged_path, dense_path, device)
    circuit = load(circuit_path)
    provenance = circuit.provenance
    source = provenance.model_sha256
    if source not in (sparse.sha256, sparse.meta.get("sparse_sha256")):
        raise UserError(f"{circuit_path} was not extracted from the sparse model of {bridged_path} "
                        f"(source.sha256 {str(source)[:12]})")
    if provenance.task is None:
        raise UserError(f"{circuit_path}'s header names no task (task.name)")
    task = get_task(provenance.task)
    batch = encode_examples(task, task.examples("heldout", n, seed), dense.tokenizer, dense.config.block_size)
    kind = provenance.ablation.kind
    fills = fills_for(sparse.model, kind, declared_means(sparse, provenance) if kind == "mean" else None)
    dense_ir, sparse_ir = trace(dense.model), trace(sparse.model)
    keep = circuit_mask(circuit, sparse.model)

    def masked_ir(mask):
        module = mask_graph(sparse_ir, fills, mask)
        return GraphIR(module, sparse_ir.sites, sparse_ir.nonzeros, sparse_ir.norms)

    tokens = batch.tokens.to(device_of(dense.model))
    dense_pairs = candidate_logits(dense.model(tokens), batch)
    out = {"task": task.name, "n": len(batch), "circuit_nodes": circuit.n_nodes,
           "dense_task_loss": float(binary_loss(dense_pairs)), "boundaries": []}
    circuit_ir, ablated_ir = masked_ir(keep), masked_ir(complement(keep))
    for point in bridges.points:
        decoder = bridges.decoder(point)
        row = {"boundary": point}
        for name, graph_ir in (("circuit", circuit_ir), ("ablated", ablated_ir), ("sparse", sparse_ir)):
            pairs = candidate_logits(hybrid(graph_ir, dense_ir, point, decoder)(tokens), batch)
            row[f"{name}_task_loss"] = float(binary_loss(pairs))
            row[f"{name}_agreement"] = float(((pairs[:, 0] > pairs[:, 1]) == (dense_pairs[:, 0] > dense_pairs[:, 1]))
                                             .float().mean())
        row["ablation_change"] = row["ablated_task_loss"] - row["sparse_task_loss"]
        out["boundaries"].append(row)
    return out
