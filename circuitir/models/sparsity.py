"""Weight sparsity: the top-k projection and its annealing schedule.

After every optimiser step each sparse matrix keeps exactly its k largest
|w|, where the k largest of every row and every column (up to ``min_per_neuron``
of each) are forced in first, so no neuron or residual channel is cut off.
k falls linearly from dense to the target over ``[anneal_start, anneal_end]``
(fractions of training).
"""

from __future__ import annotations

import torch


def nonzeros_for(numel: int, density: float) -> int:
    return max(1, min(numel, round(density * numel)))


@torch.no_grad()
def topk_mask(weight: torch.Tensor, k: int, min_per_neuron: int = 4) -> torch.Tensor:
    """Boolean mask with exactly ``k`` True entries (k >= forced entries), rows and columns covered."""
    magnitude = weight.abs()
    rows, cols = weight.shape
    forced = torch.zeros_like(weight, dtype=torch.bool)
    per_row = min(min_per_neuron, cols)
    per_col = min(min_per_neuron, rows)
    forced.scatter_(1, magnitude.topk(per_row, dim=1).indices, True)
    forced.scatter_(0, magnitude.topk(per_col, dim=0).indices, True)
    n_forced = int(forced.sum())
    k = max(k, n_forced)
    # Forced entries rank above everything else; the rest compete on magnitude.
    score = torch.where(forced, torch.full_like(magnitude, float("inf")), magnitude).flatten()
    mask = torch.zeros(rows * cols, dtype=torch.bool, device=weight.device)
    mask[score.topk(k, sorted=False).indices] = True
    return mask.view(rows, cols)


@torch.no_grad()
def project_(weight: torch.Tensor, density: float, min_per_neuron: int = 4) -> torch.Tensor:
    """Zero all but the top-k entries of ``weight`` in place; returns the kept mask."""
    if density >= 1.0:
        return torch.ones_like(weight, dtype=torch.bool)
    mask = topk_mask(weight, nonzeros_for(weight.numel(), density), min_per_neuron)
    weight.masked_fill_(~mask, 0.0)  # not mul_: a negative weight times 0 would be stored as -0.0
    return mask


def density_at(step: int, total_steps: int, target: float, anneal_start: float = 0.01,
               anneal_end: float = 0.5) -> float:
    """Density (kept fraction) at ``step``: 1 until anneal_start, linear to target by anneal_end."""
    if total_steps <= 0:
        return target
    progress = step / total_steps
    if progress <= anneal_start:
        return 1.0
    if progress >= anneal_end or anneal_end <= anneal_start:
        return target
    frac = (progress - anneal_start) / (anneal_end - anneal_start)
    return 1.0 + (target - 1.0) * frac


def lr_at(step: int, total_steps: int, base_lr: float, warmup: float = 0.01) -> float:
    """Linear warmup over the first ``warmup`` fraction, then linear decay to zero."""
    warmup_steps = max(1, int(warmup * total_steps))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
