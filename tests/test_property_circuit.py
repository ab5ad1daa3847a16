"""The defining property (DESIGN §3), for all models, masks and inputs.

compile(Circuit.from_mask(model, mask, ablation)) on any token sequence equals
the source model run with every node outside the mask ablated as declared, to
1e-4 in float32, and so does the circuit after emit -> parse.

Hypothesis draws the model's shape and options, its weights (through a seed)
and density, the mask (empty and full included), the ablation, the norm mode
and the tokens; a failure prints the drawn case, seed included, shrunk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitir.grammar import emit, parse
from circuitir.ir.ablation import ablate, fills_for, norm_scales, site_means
from circuitir.ir.circuit import Circuit
from circuitir.models.config import ACTIVATION_SPARSITY_LOCATIONS, GPTConfig
from circuitir.models.gpt import SparseGPT
from circuitir.models.sparsity import project_
from circuitir.runtime.compile import compile_circuit

VOCAB = 24
EXAMPLES = 120  # about 25 s on one core; `pytest -m slow` runs 1000 more


@st.composite
def cases(draw):
    afrac = draw(st.sampled_from([None, 0.25, 0.5]))
    locations = draw(st.lists(st.sampled_from(ACTIVATION_SPARSITY_LOCATIONS), min_size=1, max_size=8, unique=True))
    config = GPTConfig(
        n_layer=draw(st.integers(1, 2)), n_head=draw(st.integers(1, 2)), d_head=draw(st.sampled_from([2, 4])),
        d_model=draw(st.sampled_from([4, 8, 12])), d_mlp=draw(st.sampled_from([4, 8, 16])),
        vocab_size=VOCAB, block_size=12, sink=draw(st.booleans()), rms_norm=draw(st.booleans()),
        afrac=afrac, afrac_loctypes=",".join(locations), enable_bigram_table=draw(st.booleans()),
        activation_type=draw(st.sampled_from(["gelu", "relu"])), tied_unembed=draw(st.booleans()))
    return {
        "config": config,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "density": draw(st.sampled_from([1.0, 0.5, 0.2, 0.05])),
        "keep_fraction": draw(st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0])),
        "ablation": draw(st.sampled_from(["mean", "zero"])),
        "norm": draw(st.sampled_from(["live", "frozen"])),
        "seq_len": draw(st.integers(1, 12)),
        "candidates": draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3, unique=True)),
    }


def build(case):
    """A random weight-sparse model, its means and scales, a mask and tokens, all from the case's seed."""
    generator = torch.Generator().manual_seed(case["seed"])
    model = SparseGPT(case["config"])
    model.reset_parameters(generator)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # larger than init so every nonlinearity matters
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        for param in model.sparse_parameters().values():
            project_(param.data, case["density"], min_per_neuron=1)
    model.eval()
    corpus = torch.randint(0, VOCAB, (4, 12), generator=generator)
    means = site_means(model, corpus)
    scales = norm_scales(model, corpus)
    mask = {name: torch.rand(site.width, generator=generator) < case["keep_fraction"]
            for name, site in model.sites().items()}
    tokens = torch.randint(0, VOCAB, (3, case["seq_len"]), generator=generator)
    return model, means, scales, mask, tokens


def reference_logits(model, mask, case, means, scales, tokens):
    frozen = scales if case["norm"] == "frozen" else None
    with torch.no_grad():
        return ablate(model, mask, fills_for(model, case["ablation"], means), frozen)(tokens)[..., case["candidates"]]


def check_case(case):
    torch.set_num_threads(1)
    model, means, scales, mask, tokens = build(case)
    circuit = Circuit.from_mask(model, mask, ablation=case["ablation"], means=means, norm=case["norm"],
                                frozen_scales=scales, candidates=case["candidates"])
    circuit.verify()
    expected = reference_logits(model, mask, case, means, scales, tokens)
    with torch.no_grad():
        got = compile_circuit(circuit)(tokens)
        reparsed = parse(emit(circuit))
        assert reparsed == circuit
        got_text = compile_circuit(reparsed)(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4, f"circuit differs from ablated model (seed {case['seed']})"
    assert torch.equal(got_text, got), "emit -> parse changed what the circuit computes"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(cases())
def test_circuit_equals_ablated_model(case):
    check_case(case)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(cases())
def test_circuit_equals_ablated_model_long(case):
    check_case(case)


@pytest.mark.parametrize("keep_fraction", [0.0, 1.0])
@pytest.mark.parametrize("norm", ["live", "frozen"])
def test_empty_and_full_masks(keep_fraction, norm):
    """The extremes, on a model with every option on: nothing kept, and everything kept."""
    config = GPTConfig(n_layer=2, n_head=2, d_head=4, d_model=8, d_mlp=16, vocab_size=VOCAB, block_size=12,
                       sink=True, rms_norm=False, afrac=0.5, afrac_loctypes="attn_q,mlp_neuron",
                       enable_bigram_table=True)
    case = {"config": config, "seed": 7, "density": 0.5, "keep_fraction": keep_fraction, "ablation": "mean",
            "norm": norm, "seq_len": 9, "candidates": [1, 2]}
    check_case(case)
    model, means, scales, mask, _ = build(case)
    circuit = Circuit.from_mask(model, mask, means=means, norm=norm, frozen_scales=scales, candidates=[1, 2])
    if keep_fraction == 0.0:
        assert circuit.n_nodes == 0
    else:
        # Everything reaches the logits in a dense-enough model with live norms coupling all channels.
        assert circuit.n_nodes > 0.5 * sum(site.width for site in model.sites().values())


def zero_model() -> SparseGPT:
    """A 1-layer model (d_model 4, d_mlp 4, one head of 2) with every trainable weight zero: set a few by hand."""
    model = SparseGPT(GPTConfig(n_layer=1, n_head=1, d_head=2, d_model=4, d_mlp=4, vocab_size=VOCAB, block_size=8))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.zero_()
    return model


def test_dead_code_is_dropped_without_changing_logits():
    """A kept node with no path to the logits is dropped by from_mask, and the logits do not move."""
    model = zero_model()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(1.0)
        model.lm_head.weight[:, 0] = torch.arange(VOCAB, dtype=torch.float32)  # logits read channel 0 only
        model.transformer.wte.weight[:, 0] = 1.0
        model.transformer.h[0].mlp.c_fc.weight[1, 2] = 1.0  # neuron 1 reads channel 2 ...
        model.transformer.h[0].mlp.c_proj.weight[3, 1] = 1.0  # ... and writes channel 3, which nothing reads
    mask = {"0.mlp.act_in": torch.tensor([False, False, True, False]),
            "0.mlp.post_act": torch.tensor([False, True, False, False]),
            "final_resid": torch.tensor([True, False, False, False])}
    means = {name: torch.zeros(site.width) for name, site in model.sites().items()}
    circuit = Circuit.from_mask(model, mask, means=means, norm="frozen",
                                frozen_scales={name: 1.0 for name in model.norms()}, candidates=[1, 2])
    assert [str(n) for n in circuit.kept_nodes()] == ["final_resid[0]"]
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ablate(model, mask, fills_for(model, "mean", means), {n: 1.0 for n in model.norms()})(tokens)[..., [1, 2]]
    assert torch.allclose(compile_circuit(circuit)(tokens), expected, atol=1e-6)
    assert torch.allclose(expected[..., 1] - expected[..., 0], torch.ones_like(expected[..., 0]))


def test_compiling_many_circuits_leaves_nothing_behind_in_torch_fx():
    """Each compile used to register `take` again in torch.fx's global table of wrapped functions (the
    traced module's code calls `wrap`), so every later trace walked every earlier entry: thousands of
    compiles in one process (the fuzzer) slowed down quadratically and kept every module's code alive."""
    import torch.fx._symbolic_trace as fx_trace

    from circuitir.grammar import parse
    from circuitir.runtime.compile import compile_circuit

    table = getattr(fx_trace, "_wrapped_fns_to_patch", None)
    if table is None:
        pytest.skip("this torch keeps no table of wrapped functions")
    circuit = parse((Path(__file__).resolve().parent.parent / "examples" / "bracket_toy.cir").read_text())
    compile_circuit(circuit)
    before = len(table)
    for _ in range(20):
        compile_circuit(circuit)
    assert len(table) == before
