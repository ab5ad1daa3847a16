"""Model configuration, field-compatible with OpenAI's released ``GPTConfig``.

A released ``beeg_config.json`` loads through :meth:`GPTConfig.from_openai`
(``from_dict`` with OpenAI's defaults for absent fields): training-only keys
are ignored, the old name ``n_mlp`` becomes ``d_mlp``, and architecture
options this implementation does not have are refused by name (silently
ignoring one would give wrong logits).

Every field of OpenAI's reference ``GPTConfig`` is accounted for:

* forward-pass fields, implemented: ``block_size``, ``vocab_size``,
  ``n_layer``, ``n_head``, ``d_head``, ``d_model``, ``d_mlp`` (``n_mlp``),
  ``bias``, ``ln_bias``, ``rms_norm``, ``residual_activation_type``,
  ``activation_type``, ``afrac``, ``afrac_loctypes``, ``tied_unembed``,
  ``enable_bigram_table``, ``sink``;
* kept in :attr:`GPTConfig.extra` and otherwise ignored, because they change
  training, kernels, speed or initialisation but not the logits of loaded
  weights: ``dropout``, ``flash``, ``grad_checkpointing``, ``debug_nans``,
  ``enable_sparse_kernels``, ``learnable_bigram_table`` (parameter or buffer,
  same key), ``bigram_table_rank`` (OpenAI's own loader drops it),
  ``dropout_cat_pos_emb`` and ``sinusoidal_cat_pos_emb`` (they only touch the
  concatenated positional embedding, refused below), and ``tokenizer_name``
  (it names the tokenizer; see :mod:`circuitir.models.tokenizer`); and from
  older releases ``pfrac``, ``expansion_factor(_mlp)``, ``debug_exact_topk``,
  ``sparse_matmul_impl``, and ``n_embd`` (GPT-2's ``d_model``: it must agree);
* refused with one line: ``d_pos_emb`` set to anything (OpenAI's model then
  *concatenates* a separate positional embedding to every layer's input, with
  its own norms: other weight shapes and other sites), ``use_tied_aux_matrix``
  true (OpenAI's loader refuses it too), an ``afrac_loctypes`` location other
  than those in :data:`ACTIVATION_SPARSITY_LOCATIONS` (e.g. ``resid_post_mlp``),
  and any key nobody has told circuitir about.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from circuitir.errors import UserError

ACTIVATION_SPARSITY_LOCATIONS = (
    "attn_in", "attn_q", "attn_k", "attn_v", "attn_out",
    "mlp_in", "mlp_neuron", "mlp_out",
)

# Keys found in OpenAI's configs that only matter to their training, kernels or
# bookkeeping. Any other unknown key is refused: it may be an architecture
# option, and ignoring one would give wrong logits without a word.
IGNORED_KEYS = frozenset({
    "dropout", "flash", "grad_checkpointing", "debug_nans", "tokenizer_name",
    "enable_sparse_kernels", "dropout_cat_pos_emb", "learnable_bigram_table",
    "sinusoidal_cat_pos_emb", "bigram_table_rank",
    # Older released configs also carry these (OpenAI's loader drops them): training and kernel settings.
    "pfrac", "expansion_factor_mlp", "debug_exact_topk", "sparse_matmul_impl",
    "lr", "learning_rate", "batch_size", "total_tokens", "seed", "weight_decay",
    "warmup", "warmup_frac", "beta1", "beta2", "eps", "init_std", "run_name",
    "expansion_factor", "ef", "density", "target_density", "anneal_frac",
})

# Options whose non-default values change the forward pass in ways not implemented here.
UNSUPPORTED_OPTIONS = {
    "use_tied_aux_matrix": False,
}

# The defaults of OpenAI's reference GPTConfig where they differ from ours. A released
# beeg_config.json normally lists every field; one that leaves a field out means theirs.
OPENAI_DEFAULTS = {
    "block_size": 1024, "vocab_size": 50304, "n_layer": 12, "n_head": 12, "d_head": None,
    "d_model": 768, "d_mlp": None, "rms_norm": False, "tied_unembed": True,
}


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 8
    d_head: int = 16
    d_model: int = 128
    d_mlp: int = 512
    bias: bool = True
    ln_bias: bool = True
    rms_norm: bool = True
    residual_activation_type: str = "identity"
    activation_type: str = "gelu"
    afrac: float | None = None
    afrac_loctypes: str = "attn_in,attn_out,mlp_in,mlp_out"
    tied_unembed: bool = False
    enable_bigram_table: bool = False
    d_pos_emb: int | None = None
    sink: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.d_head is None:
            self.d_head = self.d_model // self.n_head
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(f"invalid model config: {message}")

        for name in ("block_size", "vocab_size", "n_layer", "n_head", "d_head", "d_model", "d_mlp"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        for name in ("bias", "ln_bias", "rms_norm", "tied_unembed", "enable_bigram_table", "sink"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(self.afrac is None or (isinstance(self.afrac, (int, float)) and not isinstance(self.afrac, bool)),
             f"afrac must be null or a number, got {self.afrac!r}")
        need(isinstance(self.afrac_loctypes, str), f"afrac_loctypes must be a string, got {self.afrac_loctypes!r}")
        need(self.residual_activation_type in ("identity", "relu"),
             f"residual_activation_type must be identity or relu, got {self.residual_activation_type!r}")
        need(self.activation_type in ("gelu", "relu"),
             f"activation_type must be gelu or relu, got {self.activation_type!r}")
        need(self.afrac is None or 0 < self.afrac <= 1, f"afrac must be in (0, 1], got {self.afrac!r}")
        for loc in self.sparsity_locations:
            need(loc in ACTIVATION_SPARSITY_LOCATIONS,
                 f"unknown activation-sparsity location {loc!r} in afrac_loctypes "
                 f"(known: {', '.join(ACTIVATION_SPARSITY_LOCATIONS)})")
        need(self.d_pos_emb is None,
             f"d_pos_emb={self.d_pos_emb!r}: concatenated positional embeddings (a separate positional "
             "vector joined to every layer's input, with its own norms) are not supported by circuitir; "
             "only models with d_pos_emb null load")

    @property
    def sparsity_locations(self) -> tuple[str, ...]:
        if self.afrac is None:
            return ()
        return tuple(loc for loc in self.afrac_loctypes.split(",") if loc)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_openai(cls, raw: dict) -> "GPTConfig":
        """Read a released ``beeg_config.json``: absent fields take OpenAI's defaults, not ours."""
        if not isinstance(raw, dict):
            raise UserError("invalid model config: expected a JSON object of config fields")
        filled = dict(raw)
        if "n_mlp" in filled:
            filled.setdefault("d_mlp", filled["n_mlp"])
        if "n_embd" in filled:
            filled.setdefault("d_model", filled["n_embd"])
        for key, value in OPENAI_DEFAULTS.items():
            filled.setdefault(key, value)
        return cls.from_dict(filled)

    @classmethod
    def from_dict(cls, raw: dict) -> "GPTConfig":
        """Build from an OpenAI-style config dict, refusing options we would silently get wrong."""
        if not isinstance(raw, dict):
            raise UserError("invalid model config: expected a JSON object of config fields")
        raw = dict(raw)
        if "n_mlp" in raw and "d_mlp" not in raw:
            raw["d_mlp"] = raw.pop("n_mlp")
        raw.pop("n_mlp", None)
        if "n_embd" in raw:  # GPT-2's name for d_model, in some older released configs
            n_embd = raw.pop("n_embd")
            raw.setdefault("d_model", n_embd)
            if raw["d_model"] != n_embd:
                raise UserError(f"invalid model config: n_embd={n_embd!r} and d_model={raw['d_model']!r} disagree")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for key, value in raw.items():
            if key in known:
                kwargs[key] = value
            elif key in UNSUPPORTED_OPTIONS:
                if value not in (UNSUPPORTED_OPTIONS[key], None):
                    raise UserError(f"invalid model config: option {key}={value!r} is not supported by circuitir")
            elif key in IGNORED_KEYS:
                extra[key] = value
            else:
                raise UserError(
                    f"invalid model config: unknown option {key!r}; circuitir cannot tell whether it "
                    "changes the forward pass (remove it from the config if it is training-only)")
        try:
            config = cls(**kwargs)
        except TypeError as exc:
            raise UserError(f"invalid model config: {exc}") from None
        config.extra = extra
        return config
