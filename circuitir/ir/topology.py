"""The architecture's dataflow, written once, as rows (tinygrad's pattern tables are the style).

Two tables describe a SparseGPT layer to every part of the compiler:

* ``SITES``: the sites of one layer in forward order: sublayer, kind, how wide
  (``d_model``, ``heads`` = n_head*d_head, ``d_mlp``), the activation-sparsity
  location applied right after it (AbsTopK), and for residual reads the norm
  they go through;
* ``MATRICES``: every weight matrix of a layer: the site kind it reads, the
  site kind it writes, its module path in the block, the rows it owns when
  q, k and v share one fused matrix, and how its input reaches its output
  (``direct``, through an ``activation``, or through attention ``heads``).

Around the layers: the embedding writes every residual channel, each
``resid_delta`` adds to it, each ``act_in`` (and ``final_resid``, read by the
unembedding) reads it through a norm.

``site_specs`` (sites and widths), ``trace`` (which matrices read and write a
site), ``lower`` (which weights become edges, which ablated inputs become
constants), ``fold-constants`` (which constants fold into biases) and
``compile`` (which matrices the circuit multiplies by) all read these rows;
adding a sublayer or a matrix is adding rows here (and its forward in
``compile``, the one place attention is spelled out).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteRule:
    sublayer: str          # attn | mlp
    kind: str              # act_in, q, k, v, resid_delta, post_act
    width: str             # d_model | heads | d_mlp
    topk: str              # the activation-sparsity location right after the site
    norm: str | None = None  # the block's norm a residual read goes through


@dataclass(frozen=True)
class Matrix:
    sublayer: str
    src: str               # site kind read (columns)
    dst: str               # site kind written (rows)
    module: str            # path in the block: "attn.c_attn"
    part: int | None = None  # rows [part*W, (part+1)*W) of a fused q/k/v matrix
    via: str = "direct"    # direct | activation (dst = act(W x + b)) | heads (x reaches dst through patterns)

    def weight(self, block):
        """(rows, columns) weight and bias of this matrix in a model's block, fused parts sliced."""
        linear = block.get_submodule(self.module)
        weight, bias = linear.weight, linear.bias
        if self.part is not None:
            width = weight.shape[0] // 3
            rows = slice(self.part * width, (self.part + 1) * width)
            weight, bias = weight[rows], None if bias is None else bias[rows]
        return weight, bias


SITES = (
    SiteRule("attn", "act_in", "d_model", "attn_in", norm="ln_1"),
    SiteRule("attn", "q", "heads", "attn_q"),
    SiteRule("attn", "k", "heads", "attn_k"),
    SiteRule("attn", "v", "heads", "attn_v"),
    SiteRule("attn", "resid_delta", "d_model", "attn_out"),
    SiteRule("mlp", "act_in", "d_model", "mlp_in", norm="ln_2"),
    SiteRule("mlp", "post_act", "d_mlp", "mlp_neuron"),
    SiteRule("mlp", "resid_delta", "d_model", "mlp_out"),
)

MATRICES = (
    Matrix("attn", "act_in", "q", "attn.c_attn", part=0),
    Matrix("attn", "act_in", "k", "attn.c_attn", part=1),
    Matrix("attn", "act_in", "v", "attn.c_attn", part=2),
    Matrix("attn", "v", "resid_delta", "attn.c_proj", via="heads"),
    Matrix("mlp", "act_in", "post_act", "mlp.c_fc", via="activation"),
    Matrix("mlp", "post_act", "resid_delta", "mlp.c_proj"),
)

RESIDUAL_READS = ("act_in", "final_resid")   # site kinds that read the residual stream through a norm
RESIDUAL_WRITES = ("resid_delta",)           # site kinds that add to it (besides the embedding)
UNEMBED = "lm_head.weight"
EMBED = "transformer.wte.weight"


def width_of(rule: SiteRule, config: dict) -> int:
    return {"d_model": config["d_model"], "heads": config["n_head"] * config["d_head"],
            "d_mlp": config["d_mlp"]}[rule.width]


def site_name(layer: int, sublayer: str, kind: str) -> str:
    return f"{layer}.{sublayer}.{kind}"


def matrix_name(layer: int, matrix: Matrix) -> str:
    return f"transformer.h.{layer}.{matrix.module}.weight"


def matrices_into(sublayer: str, kind: str) -> list[Matrix]:
    return [m for m in MATRICES if m.sublayer == sublayer and m.dst == kind]


def matrices_from(sublayer: str, kind: str) -> list[Matrix]:
    return [m for m in MATRICES if m.sublayer == sublayer and m.src == kind]
