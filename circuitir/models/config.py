"""Model configuration, field-compatible with OpenAI's released ``GPTConfig``.

A released ``beeg_config.json`` loads through :meth:`GPTConfig.from_dict`:
training-only keys are ignored, the old name ``n_mlp`` becomes ``d_mlp``, and
architecture options this implementation does not have are refused by name
(silently ignoring one would give wrong logits).
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
    "lr", "learning_rate", "batch_size", "total_tokens", "seed", "weight_decay",
    "warmup", "warmup_frac", "beta1", "beta2", "eps", "init_std", "run_name",
    "expansion_factor", "ef", "density", "target_density", "anneal_frac",
})

# Options whose non-default values change the forward pass in ways not implemented here.
UNSUPPORTED_OPTIONS = {
    "sinusoidal_cat_pos_emb": False,
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
        need(self.d_pos_emb is None or self.d_pos_emb == self.d_model,
             "concatenated positional embeddings (d_pos_emb != d_model) are not supported")

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
    def from_dict(cls, raw: dict) -> "GPTConfig":
        """Build from an OpenAI-style config dict, refusing options we would silently get wrong."""
        if not isinstance(raw, dict):
            raise UserError("invalid model config: expected a JSON object of config fields")
        raw = dict(raw)
        if "n_mlp" in raw and "d_mlp" not in raw:
            raw["d_mlp"] = raw.pop("n_mlp")
        raw.pop("n_mlp", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for key, value in raw.items():
            if key in known:
                kwargs[key] = value
            elif key in UNSUPPORTED_OPTIONS:
                if value != UNSUPPORTED_OPTIONS[key]:
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
