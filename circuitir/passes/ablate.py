"""Ablation passes: choose what every channel outside the circuit is replaced by.

``mean-ablate`` measures per-channel means at every site (a recording
rewrite of the traced graph, ``ir/masked.py: with_recordings``), over the
pretraining corpus (default) or the task's train prompts, and records them in
the pipeline state as the fill values every masked graph built from it uses
(``x*m + mean*(1-m)``, inserted after each site node by ``mask_graph``).
Nothing is set on the model. Means are cached on disk per (model hash,
corpus hash, token count, seed), so a second extraction does not recompute
them. ``zero-ablate`` fills with zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitir.errors import UserError
from circuitir.ir.ablation import site_means
from circuitir.passes.manager import PipelineState, register


def cache_dir() -> Path:
    root = os.environ.get("CIRCUITIR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "circuitir")
    return Path(root)


def corpus_windows(corpus_tokens: torch.Tensor, block_size: int, n_tokens: int, seed: int) -> torch.Tensor:
    """``n_tokens`` worth of evenly spread, seed-shifted windows of the corpus."""
    windows = max(1, n_tokens // block_size)
    span = len(corpus_tokens) - block_size - 1
    if span <= 0:
        raise UserError("corpus is shorter than one context window")
    generator = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(0, max(1, span // windows), (), generator=generator))
    starts = (torch.linspace(0, span - 1, windows).long() + shift).clamp(max=span - 1)
    return torch.stack([corpus_tokens[s:s + block_size].long() for s in starts])


def check_token_count(tokens: int, context: str = "") -> None:
    from circuitir.grammar.schema import MAX_ABLATION_TOKENS

    if not 0 < tokens <= MAX_ABLATION_TOKENS:
        raise UserError(f"{context}mean-ablate{{tokens}} must be from 1 to {MAX_ABLATION_TOKENS:,} (2^30), "
                        f"got {tokens}")


def pretrain_means(loaded, tokens: int, seed: int, graph_ir=None) -> tuple[dict, dict]:
    """Per-site means over ``tokens`` corpus tokens, from the cache when possible."""
    from circuitir.data.corpus import load_corpus
    from circuitir.models.checkpoint import atomic_path

    check_token_count(tokens)

    corpus_info = loaded.meta.get("corpus", {})
    corpus = load_corpus(corpus_info.get("root") if corpus_info.get("root") and
                         Path(corpus_info["root"]).is_dir() else None, loaded.tokenizer)
    key = f"{loaded.sha256[:16]}-{corpus.sha256[:16]}-{tokens}-{seed}.pt"
    path = cache_dir() / "means" / key
    info = {"over": "pretrain", "tokens": tokens, "corpus_sha256": corpus.sha256}
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            cached = None
        if _means_fit(cached, loaded.model):
            return cached, {**info, "cached": True}
        path.unlink(missing_ok=True)  # a broken, truncated or wrong-shaped cache entry is recomputed
    windows = corpus_windows(corpus.train, loaded.config.block_size, tokens, seed)
    means = site_means(graph_ir if graph_ir is not None else loaded.model, windows)
    with atomic_path(path) as temp:
        torch.save(means, temp)
    return means, {**info, "cached": False}


def _means_fit(cached, model) -> bool:
    """Whether a cached means file holds one finite float vector per site of ``model``, of the site's width."""
    widths = {name: site.width for name, site in model.sites().items()}
    return isinstance(cached, dict) and set(cached) == set(widths) and all(
        isinstance(v, torch.Tensor) and v.dtype.is_floating_point and tuple(v.shape) == (widths[k],)
        and bool(torch.isfinite(v).all()) for k, v in cached.items())


def task_means(loaded, task, tokens: int, seed: int, graph_ir=None) -> tuple[dict, dict]:
    from circuitir.tasks.evaluate import encode_examples
    n = max(16, tokens // 32)
    batch = encode_examples(task, task.examples("train", n, seed + 7), loaded.tokenizer, loaded.config.block_size)
    # Only real (unpadded) positions count.
    from circuitir.ir.ablation import record_sites
    recorded = record_sites(graph_ir if graph_ir is not None else loaded.model, batch.tokens)
    valid = (torch.arange(batch.tokens.shape[1])[None, :] <= batch.last[:, None]).flatten()
    means = {name: values[valid].double().mean(0).float() for name, values in recorded.items()}
    return means, {"over": "task", "tokens": int(valid.sum())}


def declared_means(loaded, provenance) -> dict:
    """The means a circuit's provenance (``Circuit.provenance``) declares: over the pretraining corpus
    unless ``over = "task"``."""
    from circuitir.tasks import get_task
    ablation = provenance.ablation
    tokens, seed = ablation.tokens or 65536, provenance.seed
    if ablation.kind == "mean" and ablation.over == "task":
        return task_means(loaded, get_task(provenance.task), tokens, seed)[0]
    means, info = pretrain_means(loaded, tokens, seed)
    declared = ablation.corpus_sha256
    if ablation.kind == "mean" and declared and declared != info["corpus_sha256"]:
        raise UserError(f"the circuit's means were measured over corpus {declared[:12]}..., but this machine's "
                        f"corpus is {info['corpus_sha256'][:12]}... (another Python standard library?); "
                        "check it where the corpus is the same")
    return means


@dataclass
class MeanOptions:
    over: str = "pretrain"
    tokens: int = 65536

    def validate(self):
        if self.over not in ("pretrain", "task"):
            raise UserError(f"pipeline: mean-ablate{{over={self.over}}}: over is pretrain or task")
        check_token_count(self.tokens, "pipeline: ")


@register("mean-ablate", MeanOptions, needs=("graph",), provides=("ablation",),
          summary="replace channels outside the circuit by their mean (pretraining corpus or task prompts)")
def mean_ablate(state: PipelineState, options: MeanOptions) -> None:
    if options.over == "pretrain":
        means, info = pretrain_means(state.loaded, options.tokens, state.seed, state.graph)
    else:
        means, info = task_means(state.loaded, state.task, options.tokens, state.seed, state.graph)
    state.ablation = {"kind": "mean", "fills": means, "means": means, **info}


@dataclass
class NoOptions:
    pass


@register("zero-ablate", NoOptions, needs=("graph",), provides=("ablation",),
          summary="replace channels outside the circuit by zero")
def zero_ablate(state: PipelineState, options: NoOptions) -> None:
    fills = {name: torch.zeros(info.width) for name, info in state.graph.sites.items()}
    state.ablation = {"kind": "zero", "fills": fills, "means": fills}


@register("trace", NoOptions, provides=("graph",),
          summary="trace the model with torch.fx, sites and norms as leaves")
def trace_pass(state: PipelineState, options: NoOptions) -> None:
    from circuitir.ir.trace import trace
    state.graph = trace(state.loaded.model)
