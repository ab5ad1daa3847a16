"""Ablation on the model itself: the reference every circuit is checked against.

``ablated(model, keep, fills, frozen_scales)`` runs the source model with every
channel outside ``keep`` replaced by its fill value at its site (mean or zero
ablation), and optionally with every norm's scale frozen. ``compile(circuit)``
must agree with this to 1e-4 (DESIGN §3).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from circuitir.errors import UserError

ABLATIONS = ("mean", "zero", "resample")
NORM_MODES = ("live", "frozen")


def full_mask(model, value: bool = True) -> dict[str, torch.Tensor]:
    return {name: torch.full((site.width,), value, dtype=torch.bool) for name, site in model.sites().items()}


def check_mask(model, mask: dict) -> dict[str, torch.Tensor]:
    """Complete a partial mask (missing sites keep nothing) and check names and shapes."""
    sites = model.sites()
    unknown = set(mask) - set(sites)
    if unknown:
        raise UserError(f"mask names unknown site {sorted(unknown)[0]!r} (sites: {', '.join(sites)})")
    out = {}
    for name, site in sites.items():
        keep = torch.as_tensor(mask.get(name, torch.zeros(site.width, dtype=torch.bool)), dtype=torch.bool)
        if keep.shape != (site.width,):
            raise UserError(f"mask for {name} has shape {tuple(keep.shape)}, expected ({site.width},)")
        out[name] = keep
    return out


@torch.no_grad()
def record_sites(model, tokens: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-site activations (N*T, width) over ``tokens`` (N, T), in the model's current ablation state."""
    sites = model.sites()
    records: dict[str, list] = {name: [] for name in sites}
    for site in sites.values():
        site.recording = records[site.name]
    try:
        for start in range(0, len(tokens), batch_size):
            model(tokens[start:start + batch_size])
    finally:
        for site in sites.values():
            site.recording = None
    return {name: torch.cat([r.flatten(0, -2) for r in rec]) for name, rec in records.items()}


@torch.no_grad()
def site_means(model, tokens: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-channel mean of every site over all positions of ``tokens``, in float64 then cast."""
    sites = model.sites()
    sums = {name: torch.zeros(site.width, dtype=torch.float64) for name, site in sites.items()}
    count = 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        recorded = record_sites(model, chunk, batch_size)
        for name, values in recorded.items():
            sums[name] += values.double().sum(0)
        count += chunk.numel()
    return {name: (total / max(count, 1)).float() for name, total in sums.items()}


@torch.no_grad()
def norm_scales(model, tokens: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Mean per-token inverse scale (1/rms or 1/std) of every norm: the frozen norm mode's constants."""
    norms = model.norms()
    totals = {name: 0.0 for name in norms}
    count = 0
    handles = []
    for name, norm in norms.items():
        def hook(module, inputs, _output, name=name):
            x = inputs[0]
            if not module.rms:
                x = x - x.mean(-1, keepdim=True)
            totals[name] += float(module.inverse_scale(x).double().sum())
        handles.append(norm.register_forward_hook(hook))
    try:
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start:start + batch_size]
            model(chunk)
            count += chunk.numel()
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(torch.tensor(total / max(count, 1), dtype=torch.float32)) for name, total in totals.items()}


def fills_for(model, ablation: str, means: dict | None) -> dict[str, torch.Tensor]:
    if ablation == "zero":
        return {name: torch.zeros(site.width) for name, site in model.sites().items()}
    if ablation == "mean":
        if means is None:
            raise UserError("mean ablation needs per-site means (see circuitir.ir.ablation.site_means)")
        return {name: torch.as_tensor(means[name], dtype=torch.float32) for name in model.sites()}
    raise UserError(f"ablation {ablation!r} has no constant stand-in values; circuits support: mean, zero")


@contextmanager
def ablated(model, keep: dict[str, torch.Tensor], fills: dict[str, torch.Tensor],
            frozen_scales: dict[str, float] | None = None):
    """Run ``model`` inside the block with channels outside ``keep`` replaced by ``fills``."""
    keep = check_mask(model, keep)
    sites, norms = model.sites(), model.norms()
    try:
        for name, site in sites.items():
            site.set_ablation(keep[name], fills[name])
        if frozen_scales is not None:
            for name, norm in norms.items():
                norm.frozen_scale = torch.tensor(frozen_scales[name], dtype=torch.float32)
        yield model
    finally:
        for site in sites.values():
            site.set_ablation(None)
        for norm in norms.values():
            norm.frozen_scale = None
