"""SparseGPT against OpenAI's file format, an independent forward pass, and torch.fx."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from circuitir.errors import UserError
from circuitir.models.gpt import Site
from circuitir.models.checkpoint import load_model
from circuitir.models.config import ACTIVATION_SPARSITY_LOCATIONS, GPTConfig
from circuitir.models.gpt import SparseGPT

from conftest import randomize_, tiny_config

ALL_LOCATIONS = ",".join(ACTIVATION_SPARSITY_LOCATIONS)

# (sink, bigram, afrac, extra config) — every switch of the forward pass on and off.
VARIANTS = {
    "plain": dict(),
    "sink": dict(sink=True),
    "bigram": dict(enable_bigram_table=True),
    "afrac_default_locations": dict(afrac=0.5),
    "afrac_all_locations": dict(afrac=0.25, afrac_loctypes=ALL_LOCATIONS),
    "everything": dict(sink=True, enable_bigram_table=True, afrac=0.5, afrac_loctypes=ALL_LOCATIONS),
    "relu": dict(activation_type="relu", residual_activation_type="relu", sink=True),
    "layernorm": dict(rms_norm=False, ln_bias=True, enable_bigram_table=True),
}


def openai_keys(config: GPTConfig) -> set[str]:
    """The state-dict key names of OpenAI's released models (PAPER.md), for this config."""
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "lm_head.weight", "final_logits_bias"}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        keys |= {f"{p}.ln_1.weight", f"{p}.ln_2.weight",
                 f"{p}.attn.c_attn.weight", f"{p}.attn.c_attn.bias",
                 f"{p}.attn.c_proj.weight", f"{p}.attn.c_proj.bias",
                 f"{p}.mlp.c_fc.weight", f"{p}.mlp.c_fc.bias",
                 f"{p}.mlp.c_proj.weight", f"{p}.mlp.c_proj.bias"}
        if config.sink:
            keys.add(f"{p}.attn.attn_imp.sink_logit")
    if config.enable_bigram_table:
        keys.add("bigram_table")
    return keys


def random_config(rng: random.Random, **overrides) -> GPTConfig:
    fields = dict(block_size=rng.choice([8, 16]), vocab_size=rng.choice([256, 300]),
                  n_layer=rng.randint(1, 3), n_head=rng.randint(1, 3), d_head=rng.randint(2, 6),
                  d_model=rng.randint(6, 20), d_mlp=rng.randint(8, 40), sink=rng.random() < 0.5,
                  enable_bigram_table=rng.random() < 0.5)
    fields.update(overrides)
    return GPTConfig(**fields)


def beeg_config(config: GPTConfig, old_mlp_name: bool) -> dict:
    """An OpenAI-style config file: their field names plus training-only keys circuitir ignores."""
    raw = config.to_dict()
    if old_mlp_name:
        raw["n_mlp"] = raw.pop("d_mlp")
    raw.update(dropout=0.0, flash=True, grad_checkpointing=False, learnable_bigram_table=True)
    return raw


def write_release(directory, model: SparseGPT, raw_config: dict, drop: tuple[str, ...] = ()) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    torch.save(state, directory / "final_model.pt")
    (directory / "beeg_config.json").write_text(json.dumps(raw_config))


# ---------------------------------------------------------------- OpenAI format

@pytest.mark.parametrize("seed", range(4))
def test_openai_release_round_trip(tmp_path, seed, random_tokens):
    rng = random.Random(seed)
    config = random_config(rng, tied_unembed=(seed == 3))
    model = randomize_(SparseGPT(config), seed).eval()
    write_release(tmp_path / "release", model, beeg_config(config, old_mlp_name=seed % 2 == 0))

    loaded = load_model(tmp_path / "release")
    assert loaded.config == config
    assert loaded.config.extra["flash"] is True  # ignored keys are kept, not dropped
    tokens = random_tokens(2, config.block_size, config.vocab_size, seed)
    with torch.no_grad():
        assert torch.allclose(loaded.model(tokens), model(tokens), atol=1e-6, rtol=0)
    # The .pt with its JSON beside it loads the same way.
    again = load_model(tmp_path / "release" / "final_model.pt")
    with torch.no_grad():
        assert torch.equal(again.model(tokens), loaded.model(tokens))


@pytest.mark.parametrize("variant", ["plain", "sink", "bigram", "everything"])
def test_state_dict_keys_are_openai_names(variant):
    config = tiny_config(**VARIANTS[variant])
    assert set(SparseGPT(config).state_dict()) == openai_keys(config)


def test_openai_key_examples_present():
    keys = set(SparseGPT(tiny_config(sink=True, enable_bigram_table=True)).state_dict())
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.attn_imp.sink_logit",
                "transformer.h.1.mlp.c_proj.bias", "bigram_table", "final_logits_bias"):
        assert key in keys
    assert "transformer.h.0.attn.attn_imp.sink_logit" not in SparseGPT(tiny_config(sink=False)).state_dict()


def test_release_without_final_logits_bias_loads_as_zeros(tmp_path, make_model, random_tokens):
    model = make_model(seed=5)
    write_release(tmp_path / "release", model, beeg_config(model.config, old_mlp_name=False),
                  drop=("final_logits_bias",))
    loaded = load_model(tmp_path / "release")
    assert torch.count_nonzero(loaded.model.final_logits_bias) == 0
    tokens = random_tokens()
    with torch.no_grad():
        expected = model(tokens) - model.final_logits_bias
        assert torch.allclose(loaded.model(tokens), expected, atol=1e-6, rtol=0)


def test_release_with_mismatched_shapes_is_a_user_error(tmp_path, make_model):
    model = make_model()
    raw = beeg_config(model.config, old_mlp_name=False)
    raw["d_mlp"] = 24  # the weights were made with 16
    write_release(tmp_path / "release", model, raw)
    with pytest.raises(UserError, match="does not fit its config"):
        load_model(tmp_path / "release")


def test_release_with_missing_weight_is_a_user_error(tmp_path, make_model):
    model = make_model()
    write_release(tmp_path / "release", model, beeg_config(model.config, old_mlp_name=False),
                  drop=("transformer.h.1.mlp.c_fc.weight",))
    with pytest.raises(UserError, match="missing"):
        load_model(tmp_path / "release")


@pytest.mark.parametrize("key,value", [("rotary", True), ("use_tied_aux_matrix", True), ("d_pos_emb", 4)])
def test_unknown_architecture_options_are_refused(key, value):
    raw = tiny_config().to_dict()
    raw[key] = value
    with pytest.raises(UserError, match=key):
        GPTConfig.from_dict(raw)


# ---------------------------------------------------------------- independent forward

def reference_forward(state: dict, config: GPTConfig, idx: torch.Tensor) -> torch.Tensor:
    """OpenAI's forward written out plainly from PAPER.md: no modules, no sites."""
    B, T = idx.shape
    H, D = config.n_head, config.d_head
    width = H * D
    locations = set(config.afrac_loctypes.split(",")) if config.afrac is not None else set()

    def abstopk(x, location):
        if location not in locations:
            return x
        k = max(1, int(config.afrac * x.shape[-1]))
        indices = x.abs().topk(k, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, indices, x.gather(-1, indices))

    def linear(x, prefix):
        return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]

    def norm(x, prefix):
        if config.rms_norm:
            return F.rms_norm(x, (x.shape[-1],), state[f"{prefix}.weight"], eps=None)
        return F.layer_norm(x, (x.shape[-1],), state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)

    def act(x):
        return F.gelu(x) if config.activation_type == "gelu" else F.relu(x)

    def residual(x):
        return F.relu(x) if config.residual_activation_type == "relu" else x

    x = state["transformer.wte.weight"][idx] + state["transformer.wpe.weight"][:T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        h = abstopk(norm(x, f"{p}.ln_1"), "attn_in")
        q, k, v = linear(h, f"{p}.attn.c_attn").split(width, dim=-1)
        q, k, v = abstopk(q, "attn_q"), abstopk(k, "attn_k"), abstopk(v, "attn_v")
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores.masked_fill(future, float("-inf"))
        if config.sink:
            # An extra key with k = v = 0 and logit b: exp(b) joins the softmax denominator.
            b = state[f"{p}.attn.attn_imp.sink_logit"].view(1, H, 1, 1)
            top = torch.maximum(scores.amax(-1, keepdim=True), b)
            weights = torch.exp(scores - top)
            pattern = weights / (weights.sum(-1, keepdim=True) + torch.exp(b - top))
        else:
            pattern = torch.softmax(scores, dim=-1)
        z = (pattern @ v).transpose(1, 2).reshape(B, T, width)
        x = residual(x + abstopk(linear(z, f"{p}.attn.c_proj"), "attn_out"))
        h = abstopk(norm(x, f"{p}.ln_2"), "mlp_in")
        h = abstopk(act(linear(h, f"{p}.mlp.c_fc")), "mlp_neuron")
        x = residual(x + abstopk(linear(h, f"{p}.mlp.c_proj"), "mlp_out"))
    x = norm(x, "transformer.ln_f")
    logits = x @ state["lm_head.weight"].T + state["final_logits_bias"]
    if config.enable_bigram_table:
        logits = logits + state["bigram_table"][idx]
    return logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_forward(variant, seed, make_model, random_tokens):
    model = make_model(seed=seed, **VARIANTS[variant])
    tokens = random_tokens(3, 16, 256, seed)
    with torch.no_grad():
        ours = model(tokens)
        reference = reference_forward(model.state_dict(), model.config, tokens)
    assert ours.shape == (3, 16, 256)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


def test_reference_detects_a_changed_weight(make_model, random_tokens):
    """The comparison above has teeth: one perturbed weight moves the logits past tolerance."""
    model = make_model(seed=0, sink=True)
    tokens = random_tokens()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.h.1.attn.attn_imp.sink_logit"][0] += 1.0
    with torch.no_grad():
        assert (model(tokens) - reference_forward(state, model.config, tokens)).abs().max() > 1e-3


def test_prefix_logits_do_not_depend_on_later_tokens(make_model, random_tokens):
    model = make_model(seed=2, sink=True, afrac=0.5, afrac_loctypes=ALL_LOCATIONS)
    tokens = random_tokens(2, 16)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(tokens)[:, :10], model(changed)[:, :10], atol=1e-6, rtol=0)
        assert not torch.allclose(model(tokens)[:, 10:], model(changed)[:, 10:])


def test_abstopk_keeps_exactly_k_largest_magnitudes(make_model):
    model = make_model(afrac=0.25, afrac_loctypes="mlp_neuron")
    topk = model.transformer.h[0].mlp.topk_neuron
    x = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(0))
    out = topk(x)
    assert topk.k == 4
    assert ((out != 0).sum(-1) == 4).all()
    kept_min = torch.where(out != 0, x.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(out == 0, x.abs(), -torch.inf).amax(-1)
    assert (kept_min > dropped_max).all()
    assert torch.equal(out[out != 0], x[out != 0])


# ---------------------------------------------------------------- torch.fx

class SiteLeafTracer(torch.fx.Tracer):
    """The Graph IR's tracer contract (DESIGN §1): every Site stays one call_module node."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, Site) or super().is_leaf_module(module, qualified_name)


def site_names(n_layer: int) -> list[str]:
    per_layer = ["attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta",
                 "mlp.act_in", "mlp.post_act", "mlp.resid_delta"]
    return [f"{layer}.{name}" for layer in range(n_layer) for name in per_layer] + ["final_resid"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_symbolic_trace_gives_identical_logits(variant, make_model, random_tokens):
    model = make_model(seed=3, **VARIANTS[variant])
    traced = torch.fx.symbolic_trace(model)
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(traced(tokens), model(tokens))
        assert torch.equal(traced(tokens[:, :5]), model(tokens[:, :5]))  # shorter inputs too


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sites_are_leaf_call_modules_in_forward_order(variant, make_model, random_tokens):
    model = make_model(seed=4, **VARIANTS[variant])
    graph = SiteLeafTracer().trace(model)
    traced = torch.fx.GraphModule(model, graph)
    site_nodes = [node for node in graph.nodes
                  if node.op == "call_module" and isinstance(traced.get_submodule(node.target), Site)]
    assert [traced.get_submodule(node.target).name for node in site_nodes] == site_names(2)
    assert len(site_nodes) == 17
    assert list(model.sites()) == site_names(2)
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(traced(tokens), model(tokens))


def test_site_widths(make_model):
    model = make_model(n_head=3, d_head=5, d_model=8, d_mlp=12)
    widths = {name: site.width for name, site in model.sites().items()}
    assert widths["0.attn.q"] == widths["1.attn.v"] == 15
    assert widths["0.mlp.post_act"] == 12
    assert widths["1.attn.act_in"] == widths["0.mlp.resid_delta"] == widths["final_resid"] == 8


def test_site_ablation_changes_only_downstream(make_model, random_tokens):
    """A site ablation reaches the logits, and the model itself is untouched: the ablation is a
    rewritten graph (ir/masked.py), so the model's own output, parameters and buffers are unchanged."""
    from circuitir.ir.masked import ablate
    model = make_model(seed=6)
    tokens = random_tokens()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(tokens)
        keep = {name: torch.ones(site.width, dtype=torch.bool) for name, site in model.sites().items()}
        keep["1.mlp.post_act"] = torch.zeros(16, dtype=torch.bool)
        fills = {name: torch.zeros(site.width) for name, site in model.sites().items()}
        ablated = ablate(model, keep, fills)(tokens)
        assert torch.equal(model(tokens), before)
    assert (ablated - before).abs().max() > 1e-3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_context_longer_than_block_size_is_refused(make_model):
    model = make_model(block_size=8)
    with pytest.raises(Exception, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
