"""The top-k projection and the density / learning-rate schedules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuitir.models.sparsity import density_at, lr_at, nonzeros_for, project_, topk_mask


def random_matrix(rows: int, cols: int, seed: int, zero_fraction: float) -> torch.Tensor:
    """Normal noise with some exact zeros, as in a matrix that has been projected before (ties)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[torch.rand(rows, cols, generator=generator) < zero_fraction] = 0.0
    return weight


def forced_bound(rows: int, cols: int, per_neuron: int = 4) -> int:
    """The most entries the row and column guarantees can force in."""
    return min(rows * cols, rows * min(per_neuron, cols) + cols * min(per_neuron, rows))


def kth_largest(magnitude: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    return magnitude.topk(k, dim=dim).values.narrow(dim, k - 1, 1)


shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@settings(max_examples=150, deadline=None)
@given(shape=shapes, density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       zero_fraction=st.sampled_from([0.0, 0.3, 0.9]))
def test_topk_mask_invariants(shape, density, seed, zero_fraction):
    rows, cols = shape
    weight = random_matrix(rows, cols, seed, zero_fraction)
    k = nonzeros_for(weight.numel(), density)
    mask = topk_mask(weight, k)
    assert mask.shape == weight.shape and mask.dtype == torch.bool

    kept = int(mask.sum())
    assert k <= kept <= max(k, forced_bound(rows, cols))
    if k >= forced_bound(rows, cols):
        assert kept == k

    # No neuron and no residual channel is cut off.
    assert (mask.sum(1) >= min(4, cols)).all()
    assert (mask.sum(0) >= min(4, rows)).all()

    # Apart from entries a row or column guarantee may have forced in, the kept
    # entries are the largest: none is smaller than any dropped entry.
    magnitude = weight.abs()
    eligible = (magnitude >= kth_largest(magnitude, min(4, cols), 1)) | \
               (magnitude >= kth_largest(magnitude, min(4, rows), 0))
    competed = mask & ~eligible
    if competed.any() and (~mask).any():
        assert magnitude[competed].min() >= magnitude[~mask].max()


@settings(max_examples=100, deadline=None)
@given(shape=shapes, density=st.floats(0.01, 0.99), seed=st.integers(0, 2**16))
def test_project_keeps_values_and_is_idempotent(shape, density, seed):
    weight = random_matrix(*shape, seed, zero_fraction=0.0)
    original = weight.clone()
    mask = project_(weight, density)
    assert torch.equal(weight, original * mask)
    assert torch.equal(weight != 0, mask)  # no exact zeros in the input, so kept == nonzero
    again = weight.clone()
    assert torch.equal(project_(again, density), mask)
    assert torch.equal(again, weight)


def test_topk_mask_small_example_by_hand():
    weight = torch.tensor([[5.0, -1.0, 0.5, 0.1, 9.0, -0.2],
                           [0.3, -4.0, 0.0, 7.0, 0.05, 0.6]])
    # With one per row and per column forced, every column forces its larger entry in: 6 entries.
    mask = topk_mask(weight, k=7, min_per_neuron=1)
    assert int(mask.sum()) == 7
    # Forced: the larger |w| of each column; the seventh is the largest remaining, -1.0.
    expected = torch.tensor([[True, True, True, False, True, False],
                             [False, True, False, True, False, True]])
    assert torch.equal(mask, expected)


def test_project_dense_is_identity():
    weight = torch.randn(5, 7)
    original = weight.clone()
    assert project_(weight, 1.0).all()
    assert torch.equal(weight, original)


@pytest.mark.parametrize("numel,density,expected", [(100, 0.1, 10), (100, 0.0, 1), (7, 1.0, 7),
                                                    (7, 2.0, 7), (64, 1 / 64, 1), (1000, 0.0015, 2)])
def test_nonzeros_for(numel, density, expected):
    assert nonzeros_for(numel, density) == expected


# ---------------------------------------------------------------- schedules

TOTAL = 1000


@pytest.mark.parametrize("target", [1 / 64, 0.25])
def test_density_schedule(target):
    start, end = 0.01, 0.5
    densities = [density_at(step, TOTAL, target, start, end) for step in range(TOTAL + 1)]
    assert all(d == 1.0 for d in densities[:int(start * TOTAL) + 1])
    assert all(d == target for d in densities[int(end * TOTAL):])
    assert all(a >= b for a, b in zip(densities, densities[1:]))
    midpoint = round((start + end) / 2 * TOTAL)
    assert densities[midpoint] == pytest.approx((1 + target) / 2, abs=1e-12)
    # Linear: equal steps down across the whole annealing window.
    drops = [a - b for a, b in zip(densities[11:500], densities[12:501])]
    assert drops == pytest.approx([(1 - target) / ((end - start) * TOTAL)] * len(drops), rel=1e-9)


def test_density_schedule_degenerate_cases():
    assert density_at(5, 0, 0.1) == 0.1
    assert density_at(0, 10, 0.1, anneal_start=0.5, anneal_end=0.5) == 1.0
    assert density_at(6, 10, 0.1, anneal_start=0.5, anneal_end=0.5) == 0.1


def test_lr_schedule():
    base, warmup = 3e-3, 0.01
    warmup_steps = int(warmup * TOTAL)  # 10
    lrs = [lr_at(step, TOTAL, base, warmup) for step in range(TOTAL)]
    assert lrs[0] == pytest.approx(base / warmup_steps)
    assert lrs[4] == pytest.approx(base * 5 / warmup_steps)
    assert all(a < b for a, b in zip(lrs[:warmup_steps], lrs[1:warmup_steps]))
    assert lrs[warmup_steps - 1] == pytest.approx(base) and lrs[warmup_steps] == pytest.approx(base)
    assert all(a >= b for a, b in zip(lrs[warmup_steps:], lrs[warmup_steps + 1:]))
    halfway = warmup_steps + (TOTAL - warmup_steps) // 2
    assert lrs[halfway] == pytest.approx(base * (TOTAL - halfway) / (TOTAL - warmup_steps))
    assert lrs[-1] == pytest.approx(base / (TOTAL - warmup_steps))
    assert lr_at(TOTAL, TOTAL, base, warmup) == 0.0
    assert max(lrs) == pytest.approx(base)


def test_lr_schedule_short_run_has_one_warmup_step():
    assert lr_at(0, 6, 1.0) == 1.0  # int(0.01 * 6) == 0 warmup steps, clamped to one
    assert lr_at(5, 6, 1.0) == pytest.approx(1 / 5)
