"""The pass manager and the passes (DESIGN §4).

* pipelines as text: canonical round trips, and every way a pipeline can be wrong;
* golden tests (the xDSL/FileCheck habit): a hand-made model and mask, lowered,
  then folded, then dead-code eliminated, each stage compared with the exact
  .cir text checked in under tests/golden/ (regenerate with
  ``CIRCUITIR_UPDATE_GOLDEN=1 pytest tests/test_passes.py`` and read the diff);
* fold-constants and dce preserve the logits on random models (hypothesis);
* prune's pieces on synthetic losses: bisect, greedy minimisation, the STE;
* mean-ablate's on-disk cache of the means.
"""

from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitir.data.corpus import load_corpus
from circuitir.errors import UserError
from circuitir.grammar import emit, parse
from circuitir.ir.ablation import ablate, fills_for, site_means
from circuitir.ir.circuit import CircuitError, Node
from circuitir.ir.lower import circuit_from_mask, lower
from circuitir.ir.trace import trace
from circuitir.models.checkpoint import LoadedModel
from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.passes import DEFAULT_PIPELINE, REGISTRY, PipelineState, parse_pipeline, pipeline_text, run_pipeline
from circuitir.passes.ablate import corpus_windows, pretrain_means
from circuitir.passes.manager import PassCall
from circuitir.passes.circuit_passes import eliminate_dead_code, fold_constants, foldable_sites
from circuitir.passes.prune import HeavisideSTE, bisect, greedy_minimise
from circuitir.runtime.compile import compile_circuit

from conftest import randomize_, tiny_config
from test_property_circuit import VOCAB, build, cases, reference_logits, zero_model

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("CIRCUITIR_UPDATE_GOLDEN") == "1"


# ---------------------------------------------------------------- pipelines as text

@pytest.mark.parametrize("text", [
    "trace, mean-ablate, prune, lower, fold-constants, dce",
    "trace, mean-ablate{tokens=4096}, prune{target=0.25,steps=60,prompts=64,select=48}, lower, fold-constants, dce",
    "trace, mean-ablate{over=task}, prune{greedy=false,calibrate=true}, lower",
    "trace, zero-ablate, prune{target=1e-05,lr=0.5}, lower, dce",
])
def test_canonical_pipeline_text_round_trips(text):
    calls = parse_pipeline(text)
    assert pipeline_text(calls) == text
    assert pipeline_text(parse_pipeline(pipeline_text(calls))) == text


def test_pipeline_text_is_canonicalised():
    """Spacing goes, defaults are dropped, options come in declaration order with their types."""
    calls = parse_pipeline("  trace ,mean-ablate{ tokens = 4096 , over=pretrain },"
                           "prune{select=48, target=2e-1, greedy=False}, lower,dce  ")
    assert pipeline_text(calls) == "trace, mean-ablate{tokens=4096}, prune{target=0.2,select=48,greedy=false}, lower, dce"
    prune = calls[2].options
    assert (prune.target, prune.select, prune.greedy, prune.steps) == (0.2, 48, False, 300)
    assert isinstance(prune.select, int) and isinstance(prune.target, float)
    # The default pipeline spells out two defaults; its canonical form drops them.
    assert pipeline_text(parse_pipeline(DEFAULT_PIPELINE)) == "trace, mean-ablate, prune, lower, fold-constants, dce"


@pytest.mark.parametrize("text, fragments", [
    ("", ["pipeline: empty", "trace, mean-ablate"]),
    ("   ", ["pipeline: empty"]),
    ("trace, mean-ablate, prnue, lower", ["unknown pass 'prnue'", "known: ", "prune", "circuitir passes"]),
    ("trace, mean-ablate, prune{tagret=0.1}, lower", ["pass prune has no option 'tagret'", "options: target, steps"]),
    ("trace, zero-ablate{over=task}, prune, lower", ["pass zero-ablate has no option 'over'", "options: none"]),
    ("trace, mean-ablate, prune{steps=1.5}, lower", ["prune{steps=1.5}: expected int"]),
    ("trace, mean-ablate, prune{target=low}, lower", ["prune{target=low}: expected float"]),
    ("trace, mean-ablate, prune{greedy=yes}, lower", ["prune{greedy=yes}: expected bool"]),
    ("trace, mean-ablate, prune{target}, lower", ["prune{target}: options are key=value"]),
    ("trace, mean-ablate, prune{target=-0.1}, lower", ["prune{target} must be in (0, 100], got -0.1"]),
    ("trace, mean-ablate, prune{prompts=1}, lower", ["prune{prompts} must be from 2 to 100,000, got 1"]),
    ("trace, mean-ablate{over=dataset}, prune, lower", ["over is pretrain or task"]),
    ("trace, mean-ablate{tokens=0}, prune, lower", ["mean-ablate{tokens} must be from 1 to 1,073,741,824 (2^30), got 0"]),
    ("trace mean-ablate, prune, lower", ["cannot read 'trace mean-ablate", "column 1", "separated by commas"]),
    ("trace, prune, mean-ablate, lower", ["pass prune needs ablation", "mean-ablate or zero-ablate",
                                          "put that pass before prune"]),
    ("trace, mean-ablate, lower, prune", ["pass lower needs mask", "comes from prune", "before lower"]),
    ("mean-ablate, prune, lower", ["pass mean-ablate needs graph", "comes from trace"]),
    ("trace, mean-ablate, prune, dce, lower", ["pass dce needs circuit", "lower or fold-constants or dce"]),
    ("trace, mean-ablate, prune", ["never produces a circuit", "lower, fold-constants, dce"]),
    ("trace", ["never produces a circuit"]),
])
def test_bad_pipelines_are_user_errors(text, fragments):
    with pytest.raises(UserError) as info:
        parse_pipeline(text)
    message = str(info.value)
    assert message.startswith("pipeline: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_an_option_given_twice_is_refused():
    with pytest.raises(UserError, match=r"prune\{steps\} is given twice"):
        parse_pipeline("trace, mean-ablate, prune{steps=10,target=0.2,steps=20}, lower")


def test_every_pass_has_a_summary_and_typed_defaults():
    assert {"trace", "mean-ablate", "zero-ablate", "prune", "lower", "fold-constants", "dce"} <= set(REGISTRY)
    for spec in REGISTRY.values():
        assert spec.summary
        # The bare name is the call with every default.
        assert PassCall(spec.name, spec.options()).text() == spec.name


# ---------------------------------------------------------------- golden tests

CANDIDATES = [1, 2]


def golden_case():
    """A 1-layer model with every weight zero but a handful, its means, a mask and unit frozen norm scales.

    * head 0: k[1] = 0.5·x2, v[0] = x2 + 0.25·x1, written to residual channel 0; its query is two
      constants (1.0, 2.0) and k[0] a constant 0.5, so the pattern depends on the token through x2;
    * MLP neuron 1 = gelu(x2 + 0.5·x3 + 0.25), written to channel 0 with weight 2.0; neuron 0 is
      ablated (mean 0.5) and also writes channel 0 (weight -1.5, bias 0.125);
    * neuron 2 = gelu(-x2) is kept but writes only channel 3, which nothing kept reads: dead code;
    * ablated channels: attn x1 (mean 3.0), mlp x3 (mean 2.0), and the attention write to channel 2
      (mean 0.25), which the MLP reads after it; the logits read channel 0 with weights 0.25
      (token 1) and 0.5 (token 2).
    """
    model = zero_model()
    with torch.no_grad():
        block = model.transformer.h[0]
        block.ln_1.weight.fill_(1.0)
        block.ln_2.weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wte.weight[:, 0] = 1.0
        model.transformer.wte.weight[:, 2] = torch.arange(VOCAB) / 8
        attn, mlp = block.attn, block.mlp
        attn.c_attn.weight[2 + 1, 2] = 0.5    # k[1] <- x2
        attn.c_attn.weight[4 + 0, 2] = 1.0    # v[0] <- x2
        attn.c_attn.weight[4 + 0, 1] = 0.25   # v[0] <- x1 (ablated)
        attn.c_proj.weight[0, 0] = 1.0        # channel 0 <- v[0]
        mlp.c_fc.weight[1, 2] = 1.0
        mlp.c_fc.weight[1, 3] = 0.5
        mlp.c_fc.bias[1] = 0.25
        mlp.c_fc.weight[2, 2] = -1.0
        mlp.c_proj.weight[0, 1] = 2.0
        mlp.c_proj.weight[0, 0] = -1.5
        mlp.c_proj.bias[0] = 0.125
        mlp.c_proj.weight[3, 2] = 1.0
        model.lm_head.weight[:, 0] = torch.arange(VOCAB) / 4
    model.eval()
    means = {name: torch.zeros(site.width) for name, site in model.sites().items()}
    means["0.attn.act_in"][1] = 3.0
    means["0.attn.q"][:] = torch.tensor([1.0, 2.0])
    means["0.attn.k"][0] = 0.5
    means["0.attn.resid_delta"][2] = 0.25
    means["0.mlp.act_in"][3] = 2.0
    means["0.mlp.post_act"][0] = 0.5
    mask = {"0.attn.act_in": torch.tensor([False, False, True, False]),
            "0.attn.k": torch.tensor([False, True]),
            "0.attn.v": torch.tensor([True, False]),
            "0.attn.resid_delta": torch.tensor([True, False, False, False]),
            "0.mlp.act_in": torch.tensor([False, False, True, False]),
            "0.mlp.post_act": torch.tensor([False, True, True, False]),
            "0.mlp.resid_delta": torch.tensor([True, False, False, False]),
            "final_resid": torch.tensor([True, False, False, False])}
    scales = {name: 1.0 for name in model.norms()}
    return model, means, mask, scales


@pytest.fixture(scope="module")
def stages():
    """{stage: circuit} for lower -> fold-constants -> dce, plus the model's reference logits."""
    model, means, mask, scales = golden_case()
    lowered = lower(model, mask, fills_for(model, "mean", means), norm="frozen", frozen_scales=scales,
                    candidates=CANDIDATES, header={"ablation": {"kind": "mean"}, "norm": "frozen"})
    folded = fold_constants(copy.deepcopy(lowered))
    live = eliminate_dead_code(copy.deepcopy(folded))
    tokens = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ablate(model, mask, fills_for(model, "mean", means), scales)(tokens)[..., CANDIDATES]
    return {"lower": lowered, "fold": folded, "dce": live}, tokens, reference, (model, means, mask, scales)


GOLDEN_FILES = {"lower": (None, "lower"), "fold": ("lower", "fold-constants"), "dce": ("fold", "dce")}


@pytest.mark.parametrize("stage", ["lower", "fold", "dce"])
def test_golden_text(stage, stages):
    """tests/golden/<pass>/one_layer.expected.cir is the pass's output on the golden case, and
    one_layer.input.cir what it ran on (the previous stage's output)."""
    before, folder = GOLDEN_FILES[stage]
    files = {"expected": emit(stages[0][stage])}
    if before is not None:
        files["input"] = emit(stages[0][before])
    for kind, text in files.items():
        path = GOLDEN / folder / f"one_layer.{kind}.cir"
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"{path} missing: run with CIRCUITIR_UPDATE_GOLDEN=1 once and read it"
        assert text == path.read_text(), f"{stage} {kind} differs from {path} (diff them; update deliberately)"


@pytest.mark.parametrize("stage", ["lower", "fold", "dce"])
def test_every_stage_computes_the_ablated_model(stage, stages):
    circuits, tokens, reference, _ = stages
    with torch.no_grad():
        got = compile_circuit(circuits[stage])(tokens)
    assert (got - reference).abs().max().item() <= 1e-6
    # The model is not trivial: the logits move with the token and the position.
    assert reference[..., 0].std().item() > 0.1


def test_lower_keeps_every_ablated_input_as_a_constant(stages):
    lowered = stages[0]["lower"]
    consts = {str(n): lowered.nodes[n].value for n in lowered.const_nodes()}
    assert consts["0.attn.act_in[1]"] == 3.0 and consts["0.mlp.act_in[3]"] == 2.0
    assert consts["0.mlp.post_act[0]"] == 0.5
    assert lowered.edges[(Node("0.mlp.act_in", 3), Node("0.mlp.post_act", 1))] == 0.5
    assert lowered.nodes[Node("0.mlp.post_act", 1)].bias == 0.25  # nothing folded yet
    with pytest.raises(CircuitError, match=r"0\.mlp\.post_act\[2\] has no path to the output"):
        lowered.verify()  # the dead neuron: it is dce that makes the circuit valid


def test_fold_constants_moves_constants_into_biases(stages):
    lowered, folded = stages[0]["lower"], stages[0]["fold"]
    bias = lambda site, i: folded.nodes[Node(site, i)].bias  # noqa: E731
    assert bias("0.attn.v", 0) == 0.0 + 0.25 * 3.0                # weight x constant + bias
    assert bias("0.mlp.post_act", 1) == 0.25 + 0.5 * 2.0
    assert bias("0.mlp.resid_delta", 0) == 0.125 + (-1.5) * 0.5
    sites = foldable_sites(folded)
    assert sites == {"0.attn.act_in", "0.mlp.act_in", "0.mlp.post_act"}
    assert not [n for n in folded.const_nodes() if n.site in sites]
    assert not [e for e in folded.edges if e[0] not in folded.nodes]
    # What cannot be folded stays: the head's query and key constants (softmax is not linear) and the
    # constant residual writes of tracked channels.
    assert {str(n) for n in folded.const_nodes()} == {str(n) for n in lowered.const_nodes() if n.site not in sites}
    assert {"0.attn.q[0]", "0.attn.q[1]", "0.attn.k[0]", "0.attn.resid_delta[2]"} <= {str(n) for n in folded.const_nodes()}
    assert folded.kept_nodes() == lowered.kept_nodes()
    assert fold_constants(copy.deepcopy(folded)) == folded  # idempotent


def test_dce_drops_exactly_the_dead_nodes(stages):
    folded, live = stages[0]["fold"], stages[0]["dce"]
    dropped = {str(n) for n in set(folded.nodes) - set(live.nodes)}
    assert dropped == {"0.mlp.post_act[2]", "0.mlp.resid_delta[2]",
                       "final_resid[1]", "final_resid[2]", "final_resid[3]"}
    assert not set(live.nodes) - set(folded.nodes)
    assert (0, 0) in live.heads
    live.verify()
    assert parse(emit(live)) == live
    assert eliminate_dead_code(copy.deepcopy(live)) == live  # idempotent
    assert [str(n) for n in live.kept_nodes()] == [
        "0.attn.act_in[2]", "0.attn.k[1]", "0.attn.v[0]", "0.attn.resid_delta[0]", "0.mlp.act_in[2]",
        "0.mlp.post_act[1]", "0.mlp.resid_delta[0]", "final_resid[0]"]


def test_pass_pipeline_agrees_with_lowering_in_one_go(stages):
    """Circuit.from_mask is lower -> fold-constants -> dce: the same text as the stages, bit for bit, and
    the same kept nodes as an independent dead-code elimination that re-lowers the shrinking mask."""
    model, means, mask, scales = stages[3]
    direct = circuit_from_mask(model, mask, means=means, norm="frozen", frozen_scales=scales, candidates=CANDIDATES)
    live = stages[0]["dce"]
    assert emit(direct) == emit(live) and direct == live
    oracle = relowered_fixpoint(model, mask, fills_for(model, "mean", means), norm="frozen", frozen_scales=scales,
                                candidates=CANDIDATES)
    assert direct.kept_nodes() == oracle.kept_nodes() and direct.heads == oracle.heads


def relowered_fixpoint(model, mask, fills, **options):
    """The reference dce: lower and fold, drop the kept nodes with no path to the logits from the *mask*,
    and lower again, until nothing is dropped (what lowering itself did before dce was one pass)."""
    import networkx as nx
    keep = {name: torch.as_tensor(m, dtype=torch.bool).clone() for name, m in mask.items()}
    while True:
        circuit = fold_constants(lower(model, keep, fills, **options))
        graph = circuit.graph()
        reaching = set().union(*(nx.ancestors(graph, Node("logits", k)) for k in range(len(circuit.candidates))))
        dead = [n for n in circuit.kept_nodes() if n not in reaching]
        if not dead:
            return circuit
        for node in dead:
            keep[node.site][node.index] = False


# ---------------------------------------------------------------- fold and dce on random models

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(cases())
def test_fold_and_dce_preserve_logits(case):
    fold_and_dce_preserve_logits(case)


# Found by the property above: a top-k over the v site couples every head's v channels, so a head
# whose only kept channel is a v reaching the logits through that top-k is still computed (as lowering
# computes it), and a head with only constant v channels (live for the top-k) is not.
TOPK_V_CASES = [
    dict(config=dict(n_layer=2, n_head=2, d_head=4, d_model=4, d_mlp=4, rms_norm=False,
                     afrac_loctypes="attn_in,attn_v", tied_unembed=False, enable_bigram_table=True),
         seed=0, keep_fraction=0.3),
    dict(config=dict(n_layer=1, n_head=2, d_head=2, d_model=4, d_mlp=16, rms_norm=True,
                     afrac_loctypes="attn_v", tied_unembed=True, enable_bigram_table=False),
         seed=639191798, keep_fraction=0.1),
]


@pytest.mark.parametrize("found", TOPK_V_CASES)
def test_dce_computes_the_heads_lowering_computes_under_a_v_topk(found):
    config = GPTConfig(block_size=12, vocab_size=24, afrac=0.25, sink=True, **found["config"])
    fold_and_dce_preserve_logits({"config": config, "seed": found["seed"], "density": 0.5,
                                  "keep_fraction": found["keep_fraction"], "ablation": "mean", "norm": "live",
                                  "seq_len": 1, "candidates": [0]})


def fold_and_dce_preserve_logits(case):
    torch.set_num_threads(1)
    model, means, scales, mask, tokens = build(case)
    options = dict(ablation=case["ablation"], means=means, norm=case["norm"], frozen_scales=scales,
                   candidates=case["candidates"])
    fills = fills_for(model, case["ablation"], means)
    circuit = lower(model, mask, fills, norm=case["norm"], frozen_scales=scales, candidates=case["candidates"],
                    header={"ablation": {"kind": case["ablation"]}, "norm": case["norm"]})
    expected = reference_logits(model, mask, case, means, scales, tokens)
    kept = circuit.kept_nodes()
    for step in (None, fold_constants, eliminate_dead_code):
        if step is eliminate_dead_code:
            circuit = step(circuit, fills)
        elif step is not None:
            circuit = step(circuit)
        with torch.no_grad():
            got = compile_circuit(circuit)(tokens)
        name = getattr(step, "__name__", "lower")
        assert (got - expected).abs().max().item() <= 1e-4, f"{name} changed the logits (seed {case['seed']})"
        if step is fold_constants:
            assert circuit.kept_nodes() == kept
            assert not [n for n in circuit.const_nodes() if n.site in foldable_sites(circuit)]
    circuit.verify()
    # Every entry point gives this circuit bit for bit: Circuit.from_mask, and the passes run by the
    # pass manager on a pipeline state.
    assert emit(circuit_from_mask(model, mask, **options)) == emit(circuit)
    state = PipelineState(loaded=LoadedModel(model, ByteTokenizer(), "0" * 64, "random"), task=None,
                          candidates=case["candidates"], mask=mask, graph=trace(model),
                          ablation={"kind": case["ablation"], "fills": fills})
    if case["norm"] == "live":
        assert emit(run_pipeline(parse_pipeline_unchecked("lower, fold-constants, dce"), state).circuit) == emit(circuit)
    # dce keeps the nodes and heads an independent fixpoint dead-code elimination keeps (re-lowering the
    # shrinking mask; its constants may differ: it stops tracking a dead node's residual channel and
    # moves that channel's constant writes into the norm tables).
    oracle = relowered_fixpoint(model, mask, fills, norm=case["norm"], frozen_scales=scales,
                                candidates=case["candidates"])
    assert circuit.kept_nodes() == oracle.kept_nodes()
    assert circuit.heads == oracle.heads
    for node in circuit.kept_nodes():
        assert circuit.nodes[node].bias == pytest.approx(oracle.nodes[node].bias, rel=1e-5, abs=1e-6)


def parse_pipeline_unchecked(text):
    """The calls of a pipeline fragment (parse_pipeline insists on a whole pipeline, trace first)."""
    from circuitir.passes.manager import PassCall
    return [PassCall(name.strip(), REGISTRY[name.strip()].options()) for name in text.split(",")]


def test_dce_keeps_the_whole_query_and_key_of_a_head_it_keeps():
    """Found by the property above: with AbsTopK on the query site, head 1's kept query channel
    matters (the top-k over all queries decides what head 0 sees) while head 1's keys feed nothing
    that reaches the logits. The head stays, so its keys must too: as their ablated constants."""
    config = GPTConfig(block_size=12, vocab_size=24, n_layer=1, n_head=2, d_head=2, d_model=4, d_mlp=4,
                       rms_norm=False, afrac=0.25, afrac_loctypes="attn_q", tied_unembed=True,
                       enable_bigram_table=True)
    case = {"config": config, "seed": 0, "density": 0.2, "keep_fraction": 0.1, "ablation": "mean",
            "norm": "live", "seq_len": 1, "candidates": [0]}
    model, means, scales, mask, tokens = build(case)
    circuit = fold_constants(lower(model, mask, fills_for(model, "mean", means), candidates=[0]))
    keys = [Node("0.attn.k", 2), Node("0.attn.k", 3)]
    assert [circuit.nodes[n].kind for n in keys] == ["kept", "kept"]
    circuit = eliminate_dead_code(circuit, fills_for(model, "mean", means))
    assert circuit.nodes[Node("0.attn.q", 3)].kind == "kept" and (0, 1) in circuit.heads
    assert [(circuit.nodes[n].kind, circuit.nodes[n].value) for n in keys] == [
        ("const", float(means["0.attn.k"][2])), ("const", float(means["0.attn.k"][3]))]
    assert not [e for e in circuit.edges if e[1] in keys]
    circuit.verify()
    with torch.no_grad():
        got = compile_circuit(circuit)(tokens)
    assert (got - reference_logits(model, mask, case, means, scales, tokens)).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- prune's pieces

@pytest.mark.parametrize("n, target", [(10, 0.2), (10, 1.0), (10, 0.05), (1, 0.5), (37, 0.031), (64, 1 / 65)])
def test_bisect_finds_the_smallest_k_on_a_monotone_loss(n, target):
    order = [("site", i) for i in range(n)]
    calls = []

    def loss_of(prefix):
        calls.append(len(prefix))
        return 1.0 / (len(prefix) + 1)

    k, loss = bisect(order, loss_of, target)
    smallest = next((j for j in range(n + 1) if 1.0 / (j + 1) <= target), n)
    assert k == smallest
    assert loss == 1.0 / (k + 1)
    assert len(calls) <= math.ceil(math.log2(n + 1)) + 2  # bisection, not a scan


def test_bisect_when_nothing_meets_the_target_returns_everything():
    order = list(range(8))
    assert bisect(order, lambda prefix: 1.0, target=0.5) == (8, 1.0)


@given(st.integers(1, 60), st.data())
@settings(max_examples=50, deadline=None)
def test_bisect_on_step_losses(n, data):
    threshold = data.draw(st.integers(0, n))  # the loss meets the target from this prefix length on
    k, loss = bisect(list(range(n)), lambda prefix: 0.1 if len(prefix) >= threshold else 0.9, 0.5)
    assert (k, loss) == (threshold, 0.1)


def test_bisect_from_the_learned_kept_set_ignores_the_non_monotone_tail():
    """Past the learned kept set, restoring nodes the mask learned to ablate can raise the loss: here the
    first 10 nodes meet the target, nodes 10-89 hurt, and only nearly all nodes meet it again. Plain
    bisection from the whole order lands in the tail; bracketing from the kept count does not."""
    def loss_of(prefix):
        k = len(prefix)
        return 0.9 if k < 7 else 0.1 if k <= 10 else 0.8 if k < 90 else 0.12
    order = list(range(100))
    assert bisect(order, loss_of, 0.2)[0] >= 90
    assert bisect(order, loss_of, 0.2, start=10) == (7, 0.1)
    assert bisect(order, loss_of, 0.2, start=8) == (7, 0.1)


@pytest.mark.parametrize("start, expected_calls", [(3, [3, 6, 12, 24, 18, 21, 20, 19]), (40, [40, 20, 10, 15, 18, 19])])
def test_bisect_brackets_upward_when_the_kept_set_misses(start, expected_calls):
    calls = []

    def loss_of(prefix):
        calls.append(len(prefix))
        return 0.1 if len(prefix) >= 20 else 0.9
    assert bisect(list(range(64)), loss_of, 0.5, start=start) == (20, 0.1)
    assert calls == expected_calls  # doubling up to a prefix that meets it, then bisection below


def test_greedy_returns_exactly_the_required_set():
    nodes = [("0.mlp.post_act", i) for i in range(30)]
    required = {nodes[3], nodes[17], nodes[29]}
    shuffled = nodes[:]
    random.Random(0).shuffle(shuffled)

    def loss_of(kept):
        return 0.1 if required <= set(kept) else 2.0

    kept, loss = greedy_minimise(shuffled, loss_of, target=0.5, progress=False)
    assert set(kept) == required and loss == 0.1
    assert kept == [n for n in shuffled if n in required]  # order kept
    for node in kept:
        assert loss_of([n for n in kept if n != node]) > 0.5


def test_greedy_leaves_only_necessary_nodes_with_redundancy():
    """Loss meets the target when (a or b) and c are kept and the circuit is not too small to work:
    greedy must end at a set where every node is necessary, not at {a, b, c}."""
    a, b, c, d = ("s", 0), ("s", 1), ("s", 2), ("s", 3)

    def loss_of(kept):
        kept = set(kept)
        return 0.1 if (a in kept or b in kept) and c in kept else 1.0

    kept, loss = greedy_minimise([a, b, c, d], loss_of, target=0.5, progress=False)
    assert loss == 0.1 and len(kept) == 2 and c in kept and (a in kept) != (b in kept)
    for node in kept:
        assert loss_of([n for n in kept if n != node]) > 0.5


@given(st.integers(0, 80), st.lists(st.sets(st.integers(0, 79), max_size=6), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_greedy_ends_where_every_node_is_necessary(n, families, rng):
    """For any monotone loss (the target holds when the kept set contains one of a few required
    sets), greedy keeps the target and ends at a set from which no single node can be dropped."""
    nodes = [("s", i) for i in range(n)]
    families = [{("s", i) for i in f if i < n} for f in families]
    rng.shuffle(nodes)

    def loss_of(kept):
        kept = set(kept)
        return 0.1 if any(f <= kept for f in families) else 1.0

    kept, loss = greedy_minimise(nodes, loss_of, target=0.5, progress=False)
    assert loss == loss_of(kept) == 0.1
    assert kept == [x for x in nodes if x in set(kept)]  # a subsequence, order kept
    for node in kept:
        assert loss_of([x for x in kept if x != node]) > 0.5


def test_greedy_drops_thousands_of_unneeded_nodes_in_few_evaluations():
    """Bisection can leave thousands of nodes of which a few matter (the learned order is only good
    near the top): dropping blocks needs far fewer evaluations than one per node."""
    nodes = [("s", i) for i in range(3000)]
    required = {nodes[i] for i in (0, 5, 40, 41, 700, 2999)}
    calls = []

    def loss_of(kept):
        calls.append(len(kept))
        return 0.1 if required <= set(kept) else 1.0

    kept, _ = greedy_minimise(nodes, loss_of, target=0.5, progress=False)
    assert set(kept) == required
    assert len(calls) < 250, len(calls)


def test_greedy_on_an_empty_set():
    assert greedy_minimise([], lambda kept: 0.0, target=0.5, progress=False) == ([], 0.0)


def test_heaviside_ste_forward_is_a_step_backward_is_sigmoid_derivative():
    logits = torch.tensor([-1.0, -0.3, -1e-6, 0.0, 1e-6, 0.2, 1.0], requires_grad=True)
    out = HeavisideSTE.apply(logits)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    upstream = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, 1.0, -2.0])
    out.backward(upstream)
    s = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, upstream * s * (1 - s), atol=0, rtol=1e-6)
    assert logits.grad[3].item() == pytest.approx(0.25 * 0.5)  # sigmoid'(0) = 1/4


# ---------------------------------------------------------------- mean-ablate

@pytest.fixture
def loaded_tiny(tiny_corpus):
    """A random byte-level model whose checkpoint metadata points at the tiny corpus."""
    model = randomize_(SparseGPT(tiny_config()), seed=3, scale=0.3).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    return LoadedModel(model, ByteTokenizer(), "ab" * 32, "tiny.pt", {"corpus": {"root": str(tiny_corpus)}})


def test_pretrain_means_are_cached(monkeypatch, tmp_path, loaded_tiny, tiny_corpus):
    monkeypatch.setenv("CIRCUITIR_CACHE", str(tmp_path))
    first, info = pretrain_means(loaded_tiny, 512, seed=0)
    assert info["cached"] is False and info["over"] == "pretrain" and info["tokens"] == 512
    entries = list((tmp_path / "means").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("abababababababab-")
    second, info2 = pretrain_means(loaded_tiny, 512, seed=0)
    assert info2["cached"] is True and info2["corpus_sha256"] == info["corpus_sha256"]
    assert first.keys() == second.keys() == loaded_tiny.model.sites().keys()
    for name in first:
        assert torch.equal(first[name], second[name])
    # They are the means over the seeded windows of the corpus, nothing else.
    corpus = load_corpus(tiny_corpus, ByteTokenizer())
    direct = site_means(loaded_tiny.model, corpus_windows(corpus.train, 16, 512, 0))
    for name in first:
        assert torch.equal(first[name], direct[name])
    # Another token count or seed is another cache entry.
    assert pretrain_means(loaded_tiny, 256, seed=0)[1]["cached"] is False
    other, info3 = pretrain_means(loaded_tiny, 512, seed=1)
    assert info3["cached"] is False and not torch.equal(other["0.attn.act_in"], first["0.attn.act_in"])
    assert len(list((tmp_path / "means").iterdir())) == 3
    assert not list(tmp_path.rglob("*.part"))


def test_a_broken_cache_entry_is_recomputed(monkeypatch, tmp_path, loaded_tiny):
    monkeypatch.setenv("CIRCUITIR_CACHE", str(tmp_path))
    first, _ = pretrain_means(loaded_tiny, 512, seed=0)
    (entry,) = (tmp_path / "means").iterdir()
    entry.write_bytes(b"not a torch file")
    again, info = pretrain_means(loaded_tiny, 512, seed=0)
    assert info["cached"] is False
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert pretrain_means(loaded_tiny, 512, seed=0)[1]["cached"] is True


def test_ablation_passes_fill_the_state(monkeypatch, tmp_path, loaded_tiny):
    monkeypatch.setenv("CIRCUITIR_CACHE", str(tmp_path))
    from circuitir.tasks import get_task
    state = PipelineState(loaded=loaded_tiny, task=get_task("bracket_counting"), progress=False)
    run_pipeline(parse_pipeline("trace, mean-ablate{tokens=512}, prune, lower")[:2], state)
    assert set(state.graph.sites) == set(loaded_tiny.model.sites())
    assert state.ablation["kind"] == "mean" and state.ablation["fills"] is state.ablation["means"]
    assert torch.equal(state.ablation["fills"]["0.mlp.post_act"], pretrain_means(loaded_tiny, 512, 0)[0]["0.mlp.post_act"])
    run_pipeline(parse_pipeline("trace, zero-ablate, prune, lower")[1:2], state)
    assert state.ablation["kind"] == "zero"
    assert all(float(v.abs().sum()) == 0.0 for v in state.ablation["fills"].values())
