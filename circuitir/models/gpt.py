"""SparseGPT: a GPT-2 style, pre-norm transformer whose weights may be almost all zero.

State-dict keys and config fields are those of OpenAI's released models, so
their ``final_model.pt`` loads unchanged. Every activation named in DESIGN §2
passes through a :class:`Site`, and the forward pass has
no Python control flow on tensor values, so ``torch.fx.symbolic_trace`` works
on it as written.

One deliberate difference from OpenAI's hook placement: where activation
sparsity (AbsTopK) is on, the site comes *before* the top-k, not after it.
With the site after the top-k, whether a kept channel survives depends on
every other channel of the pre-top-k vector, so no circuit smaller than the
whole model could reproduce the ablated model exactly. With the site first,
the top-k sees kept channels and the constants that stand for ablated ones,
which a circuit can carry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from circuitir.models.config import GPTConfig


class Site(nn.Module):
    """A named place where an interpretable activation lives: an identity module.

    Like TransformerLens' HookPoint, but with no state: torch.fx keeps it as a
    leaf (``ir/trace.py``), so the traced graph has one call per site, and
    every ablation, recording or bridge is a rewrite of that graph
    (``ir/masked.py``), never an attribute set on the model.
    """

    def __init__(self, name: str, width: int):
        super().__init__()
        self.name = name
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.name!r}, width={self.width}"


class AbsTopK(nn.Module):
    """Keep the k entries of largest magnitude along the last dimension, zero the rest.

    A threshold-and-multiply mask (one ``topk`` for the k-th magnitude, then a
    comparison) is cheaper on CPU than ``topk`` + ``scatter``; exact ties at the
    threshold keep more than k entries, which float activations essentially never hit.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        magnitude = x.abs()
        threshold = magnitude.topk(self.k, dim=-1, sorted=True).values[..., -1:]
        return x * (magnitude >= threshold).to(x.dtype)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def topk_k(afrac: float, width: int) -> int:
    """How many entries AbsTopK keeps at a location of this width (at least one)."""
    return max(1, int(afrac * width))


def maybe_topk(config: GPTConfig, location: str, width: int) -> nn.Module:
    if location in config.sparsity_locations:
        return AbsTopK(topk_k(config.afrac, width))
    return nn.Identity()


def norm_inverse_scale(x: torch.Tensor, rms: bool, eps: float) -> torch.Tensor:
    """The per-token factor a norm multiplies by: 1/rms, or 1/std of the already centred ``x``."""
    if rms:
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)


class Norm(nn.Module):
    """RMSNorm or LayerNorm. It normalises each token by its own statistics; the
    ``frozen`` norm mode of a circuit (a constant 1/rms, which makes the layer
    linear) is a rewrite of the traced graph (``ir/masked.py: freeze_norms``)."""

    def __init__(self, width: int, rms: bool, bias: bool):
        super().__init__()
        self.rms = rms
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if (bias and not rms) else None
        # nn.RMSNorm's default eps (OpenAI's models use it); F.layer_norm's for LayerNorm.
        self.eps = torch.finfo(torch.float32).eps if rms else 1e-5

    def inverse_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token factor the norm multiplies by (1/rms or 1/std), live."""
        return norm_inverse_scale(x, self.rms, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            x = x - x.mean(-1, keepdim=True)
        out = x * self.inverse_scale(x) * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


class SinkLogit(nn.Module):
    """One learnable logit per head for an always-visible key slot with k = v = 0."""

    def __init__(self, n_head: int):
        super().__init__()
        self.sink_logit = nn.Parameter(torch.zeros(n_head))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        width = config.n_head * config.d_head
        self.c_attn = nn.Linear(config.d_model, 3 * width, bias=config.bias)
        self.c_proj = nn.Linear(width, config.d_model, bias=config.bias)
        self.attn_imp = SinkLogit(config.n_head) if config.sink else None
        self.scale = 1.0 / math.sqrt(config.d_head)
        prefix = f"{layer}.attn"
        self.site_act_in = Site(f"{prefix}.act_in", config.d_model)
        self.site_q = Site(f"{prefix}.q", width)
        self.site_k = Site(f"{prefix}.k", width)
        self.site_v = Site(f"{prefix}.v", width)
        self.site_resid_delta = Site(f"{prefix}.resid_delta", config.d_model)
        self.topk_in = maybe_topk(config, "attn_in", config.d_model)
        self.topk_q = maybe_topk(config, "attn_q", width)
        self.topk_k = maybe_topk(config, "attn_k", width)
        self.topk_v = maybe_topk(config, "attn_v", width)
        self.topk_out = maybe_topk(config, "attn_out", config.d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_head, self.d_head)).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.topk_in(self.site_act_in(x))
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q = self.topk_q(self.site_q(q))
        k = self.topk_k(self.site_k(k))
        v = self.topk_v(self.site_v(v))
        q, k, v = self.heads(q), self.heads(k), self.heads(v)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        causal = torch.ones_like(scores[0, 0], dtype=torch.bool).tril()  # (T, T), built from shapes
        scores = scores.masked_fill(~causal, float("-inf"))
        if self.attn_imp is not None:
            sink = self.attn_imp.sink_logit.view(1, -1, 1, 1).expand_as(scores[..., :1])
            pattern = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
        else:
            pattern = torch.softmax(scores, dim=-1)
        z = (pattern @ v).transpose(1, 2).flatten(-2)
        return self.topk_out(self.site_resid_delta(self.c_proj(z)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_mlp, bias=config.bias)
        self.act = nn.GELU() if config.activation_type == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(config.d_mlp, config.d_model, bias=config.bias)
        prefix = f"{layer}.mlp"
        self.site_act_in = Site(f"{prefix}.act_in", config.d_model)
        self.site_post_act = Site(f"{prefix}.post_act", config.d_mlp)
        self.site_resid_delta = Site(f"{prefix}.resid_delta", config.d_model)
        self.topk_in = maybe_topk(config, "mlp_in", config.d_model)
        self.topk_neuron = maybe_topk(config, "mlp_neuron", config.d_mlp)
        self.topk_out = maybe_topk(config, "mlp_out", config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.topk_in(self.site_act_in(x))
        x = self.topk_neuron(self.site_post_act(self.act(self.c_fc(x))))
        return self.topk_out(self.site_resid_delta(self.c_proj(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = Norm(config.d_model, config.rms_norm, config.ln_bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = Norm(config.d_model, config.rms_norm, config.ln_bias)
        self.mlp = MLP(config, layer)
        self.relu_residual = config.residual_activation_type == "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        if self.relu_residual:
            x = torch.relu(x)
        x = x + self.mlp(self.ln_2(x))
        if self.relu_residual:
            x = torch.relu(x)
        return x


class SparseGPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),
            wpe=nn.Embedding(config.block_size, config.d_model),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=Norm(config.d_model, config.rms_norm, config.ln_bias),
        ))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(config.vocab_size))
        if config.enable_bigram_table:
            self.bigram_table = nn.Parameter(torch.zeros(config.vocab_size, config.vocab_size))
        else:
            self.bigram_table = None
        if config.tied_unembed:
            self.transformer.wte.weight = self.lm_head.weight
        self.site_final_resid = Site("final_resid", config.d_model)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation; the positional embedding starts (and stays) zero."""
        std_proj = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    param.normal_(0.0, std_proj, generator=generator)
                elif name.endswith(".weight") and param.dim() == 2 and "wpe" not in name:
                    param.normal_(0.0, 0.02, generator=generator)
                elif name.endswith(".bias") and "ln_" not in name:
                    param.zero_()
            self.transformer.wpe.weight.zero_()
        self.transformer.wpe.weight.requires_grad_(False)

    def sites(self) -> dict[str, Site]:
        """All sites in forward order, by name."""
        return {module.name: module for module in self.modules() if isinstance(module, Site)}

    def norms(self) -> dict[str, Norm]:
        """All norms by the name of the site that reads them (``{L}.attn``, ``{L}.mlp``, ``final``)."""
        out = {}
        for layer, block in enumerate(self.transformer.h):
            out[f"{layer}.attn"] = block.ln_1
            out[f"{layer}.mlp"] = block.ln_2
        out["final"] = self.transformer.ln_f
        return out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        torch._assert(idx.size(1) <= self.config.block_size,
                      "sequence longer than the model's context (block_size)")
        seq_len = idx.size(1)
        x = self.transformer.wte(idx) + self.transformer.wpe.weight[:seq_len].unsqueeze(0)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(self.site_final_resid(x))
        logits = self.lm_head(x) + self.final_logits_bias
        if self.bigram_table is not None:
            logits = logits + F.embedding(idx, self.bigram_table)
        return logits

    def sparse_parameters(self) -> dict[str, nn.Parameter]:
        """The matrices that weight-sparse training projects to top-k (embeddings included)."""
        out = {}
        for name, param in self.named_parameters():
            if param.dim() == 2 and "wpe" not in name and "bigram" not in name:
                out[name] = param
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
