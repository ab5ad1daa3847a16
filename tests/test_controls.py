"""The controls beside check's claims (runtime/controls.py), on a synthetic loss and on a real task."""

from __future__ import annotations

import math

import pytest
import torch

from circuitir.runtime import controls
from circuitir.tasks import get_task
from circuitir.tasks.evaluate import binary_loss

WIDTHS = {"a": 4, "b": 3}


class CountingEvaluator:
    """Pair logits whose margin is the number of kept nodes (so the loss falls as nodes are added),
    recording every mask it is asked for."""

    def __init__(self):
        self.masks = []

    def pair_logits_many(self, masks):
        self.masks += masks
        margins = torch.tensor([float(sum(int(m.sum()) for m in mask.values())) for mask in masks])
        return torch.stack([margins, torch.zeros_like(margins)], dim=-1)[:, None, :]  # (M, 1, 2)


def loss_of(kept: int) -> float:
    return float(binary_loss(torch.tensor([[float(kept), 0.0]])))


def test_faithfulness_curve_and_mib_areas():
    evaluator = CountingEvaluator()
    nodes = [("a", 0), ("b", 2), ("a", 3)]
    curve = controls.faithfulness_curve(evaluator, WIDTHS, nodes, full_loss=loss_of(7))
    assert curve["loss"] == pytest.approx([loss_of(k) for k in range(4)])
    empty, full = loss_of(0), loss_of(7)
    f = [(empty - loss_of(k)) / (empty - full) for k in range(4)]
    assert curve["faithfulness"] == pytest.approx(f)
    assert curve["cpr"] == pytest.approx(sum((x + y) / 2 / 3 for x, y in zip(f, f[1:])))
    assert curve["cmd"] == pytest.approx(sum((abs(1 - x) + abs(1 - y)) / 2 / 3 for x, y in zip(f, f[1:])))
    # The k-th mask keeps exactly the k most important nodes.
    assert [sorted((s, i) for s, m in mask.items() for i in m.nonzero().flatten().tolist())
            for mask in evaluator.masks] == [[], [("a", 0)], [("a", 0), ("b", 2)], [("a", 0), ("a", 3), ("b", 2)]]


def test_random_circuits_have_the_circuits_size_and_are_seeded():
    first = controls.random_circuits(CountingEvaluator(), WIDTHS, 2, target=loss_of(2), draws=5, seed=3)
    again = controls.random_circuits(CountingEvaluator(), WIDTHS, 2, target=loss_of(2), draws=5, seed=3)
    assert first == again and first["losses"] == pytest.approx([loss_of(2)] * 5)
    assert first["reach_target"] == 5 and first["draws"] == 5


def test_partial_ablation_keeps_the_circuit_and_about_half_the_rest():
    evaluator = CountingEvaluator()
    circuit = {"a": torch.tensor([True, False, False, False]), "b": torch.zeros(3, dtype=torch.bool)}
    result = controls.partial_ablation(evaluator, circuit, target=loss_of(1), draws=40, seed=0)
    assert all(bool(mask["a"][0]) for mask in evaluator.masks)  # the circuit is never ablated
    outside = [int(mask["a"][1:].sum() + mask["b"].sum()) for mask in evaluator.masks]
    assert 2.0 < sum(outside) / len(outside) < 4.0  # 6 outside nodes, half kept on average
    assert result["max_loss"] == pytest.approx(max(loss_of(1 + k) for k in outside))
    assert result["within_target"] == sum(loss_of(1 + k) <= loss_of(1) for k in outside) == 40


def test_nonsense_task_swaps_about_half_the_labels_deterministically():
    task = get_task("brackets")
    real = task.examples("train", 200, 0)
    shuffled = controls.NonsenseTask(task, seed=1).examples("train", 200, 0)
    assert [e.prompt for e in shuffled] == [e.prompt for e in real]
    swapped = [s.correct == r.alternative and s.alternative == r.correct for s, r in zip(shuffled, real)]
    assert all(s == r or w for s, r, w in zip(shuffled, real, swapped))
    assert 70 < sum(swapped) < 130
    assert shuffled == controls.NonsenseTask(task, seed=1).examples("train", 200, 0)
    assert not math.isclose(sum(swapped), 0)
