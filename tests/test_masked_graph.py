"""Masking as a graph rewrite (ir/masked.py), for all models, masks and inputs.

The masked GraphModule is checked against an independent reference written
here with forward hooks on a *private copy* of the model: every site's output
replaced by ``where(keep, x, fill)``, every norm's output recomputed with a
constant scale when frozen. And: the mask-batch dimension gives, row by row,
what one mask at a time gives; two masked graphs of one model coexist; the
source model is never changed; the fast task evaluator (length buckets, last
position only) gives the full model's task logits.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitir.ir.masked import ablate, freeze_norms, mask_graph
from circuitir.ir.trace import trace
from circuitir.passes.prune import MaskedLoss
from circuitir.tasks.evaluate import TaskBatch, binary_loss, candidate_logits
from test_property_circuit import VOCAB, build, cases


def hooked_reference(model, keep, fills, frozen, tokens):
    """The ablated model by forward hooks on a deep copy: shares no code with ir/masked.py."""
    private = copy.deepcopy(model)
    for name, site in private.sites().items():
        site.register_forward_hook(lambda _m, _i, out, name=name: torch.where(keep[name], out, fills[name]))
    if frozen is not None:
        for point, norm in private.norms().items():
            def frozen_norm(module, inputs, _out, point=point):
                x = inputs[0] if module.rms else inputs[0] - inputs[0].mean(-1, keepdim=True)
                out = x * frozen[point] * module.weight
                return out if module.bias is None else out + module.bias
            norm.register_forward_hook(frozen_norm)
    with torch.no_grad():
        return private(tokens)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_masked_graph_equals_hooked_model(case):
    model, means, scales, mask, tokens = build(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = scales if case["norm"] == "frozen" else None
    with torch.no_grad():
        got = ablate(model, mask, means, frozen)(tokens)
    expected = hooked_reference(model, mask, means, frozen, tokens)
    assert (got - expected).abs().max().item() <= 1e-5
    # Nothing was set on the model: same state, same output as before, no gradients.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.integers(1, 5))
def test_mask_batch_rows_equal_single_masks(case, count):
    model, means, _, _, tokens = build(case)
    graph_ir = trace(model)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    masks = [{name: torch.rand(info.width, generator=generator) < 0.5 for name, info in graph_ir.sites.items()}
             for _ in range(count)]
    batched = mask_graph(graph_ir, means, {name: torch.stack([m[name] for m in masks]) for name in masks[0]})
    with torch.no_grad():
        rows = batched(tokens)
        assert rows.shape == (count, *tokens.shape, VOCAB)
        for row, mask in zip(rows, masks):
            single = ablate(graph_ir, mask, means)(tokens)
            assert (row - single).abs().max().item() <= 1e-5


def test_two_masked_graphs_of_one_model_coexist():
    case = {"config": None}
    from circuitir.models.config import GPTConfig
    case = dict(config=GPTConfig(n_layer=2, n_head=2, d_head=4, d_model=8, d_mlp=16, vocab_size=VOCAB,
                                 block_size=12), seed=3, density=0.5, keep_fraction=0.3, seq_len=6)
    model, means, scales, mask, tokens = build(case)
    graph_ir = trace(model)
    empty = {name: torch.zeros_like(m) for name, m in mask.items()}
    first, second = ablate(graph_ir, mask, means), ablate(graph_ir, empty, means, scales)
    with torch.no_grad():
        a, b = first(tokens), second(tokens)
        assert torch.equal(first(tokens), a)  # the second graph did not change the first
        assert (a - b).abs().max() > 1e-3
        assert torch.equal(model(tokens), hooked_reference(model, {n: torch.ones_like(m) for n, m in mask.items()},
                                                           means, None, tokens))
    frozen = freeze_norms(mask_graph(graph_ir, means, mask), graph_ir, scales)
    assert sum(n.target.__name__ == "frozen_norm" for n in frozen.graph.nodes if n.op == "call_function") == 5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.lists(st.integers(1, 12), min_size=2, max_size=9))
def test_fast_task_loss_equals_full_forward(case, lengths):
    """Buckets cut to their longest prompt and the last-position rewrite change nothing but rounding."""
    model, means, _, mask, _ = build(case)
    generator = torch.Generator().manual_seed(case["seed"] + 2)
    tokens = torch.randint(0, VOCAB, (len(lengths), 12), generator=generator)
    last = torch.tensor(lengths) - 1
    batch = TaskBatch(tokens, last, torch.randint(0, VOCAB, (len(lengths),), generator=generator),
                      torch.randint(0, VOCAB, (len(lengths),), generator=generator), ["p"] * len(lengths))
    evaluator = MaskedLoss(trace(model), means, batch)
    evaluator.task.rows = 2  # several buckets
    with torch.no_grad():
        expected = candidate_logits(ablate(model, mask, means)(tokens), batch)
    got = evaluator.pair_logits(mask)
    assert (got - expected).abs().max().item() <= 1e-5
    assert abs(evaluator(mask) - float(binary_loss(expected))) <= 1e-5
