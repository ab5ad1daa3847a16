"""Ablation: what stands in for the channels outside a circuit, and how it is measured.

``ablate(model, keep, fills, frozen_scales)`` (``ir/masked.py``) is the
reference every circuit is checked against: the traced model rewritten with
every channel outside ``keep`` replaced by its fill value at its site (mean or
zero ablation), and optionally with every norm's scale frozen.
``compile(circuit)`` must agree with it to 1e-4 (DESIGN §3). The means and
frozen scales come from a recording rewrite of the same graph: no hooks, no
state set on the model.
"""

from __future__ import annotations

import torch

from circuitir.errors import UserError
from circuitir.ir.masked import ablate, device_of, graph_of, with_recordings  # noqa: F401  (ablate: the reference)
from circuitir.ir.trace import GraphIR

ABLATIONS = ("mean", "zero", "resample")
NORM_MODES = ("live", "frozen")


def site_widths(model_or_graph) -> dict[str, int]:
    """Every site's width, in forward order, from a traced GraphIR's site table or a model."""
    if isinstance(model_or_graph, GraphIR):
        return {name: info.width for name, info in model_or_graph.sites.items()}
    return {name: site.width for name, site in model_or_graph.sites().items()}


def full_mask(model_or_graph, value: bool = True) -> dict[str, torch.Tensor]:
    return {name: torch.full((width,), value, dtype=torch.bool) for name, width in site_widths(model_or_graph).items()}


def check_mask(model_or_graph, mask: dict) -> dict[str, torch.Tensor]:
    """Complete a partial mask (missing sites keep nothing) and check names and shapes."""
    widths = site_widths(model_or_graph)
    unknown = set(mask) - set(widths)
    if unknown:
        raise UserError(f"mask names unknown site {sorted(unknown)[0]!r} (sites: {', '.join(widths)})")
    out = {}
    for name, width in widths.items():
        keep = torch.as_tensor(mask.get(name, torch.zeros(width, dtype=torch.bool)), dtype=torch.bool)
        if keep.shape != (width,):
            raise UserError(f"mask for {name} has shape {tuple(keep.shape)}, expected ({width},)")
        out[name] = keep
    return out


@torch.no_grad()
def record_sites(model_or_graph, tokens: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-site activations (N*T, width) over ``tokens`` (N, T), read off a recording rewrite of the graph."""
    recording = with_recordings(graph_of(model_or_graph))
    device = device_of(recording)
    records: dict[str, list] = {}
    for start in range(0, len(tokens), batch_size):
        _, sites, _ = recording(tokens[start:start + batch_size].to(device))
        for name, value in sites.items():
            records.setdefault(name, []).append(value.flatten(0, -2).cpu())
    return {name: torch.cat(values) for name, values in records.items()}


@torch.no_grad()
def site_means(model_or_graph, tokens: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-channel mean of every site over all positions of ``tokens``, in float64 then cast."""
    recording = with_recordings(graph_of(model_or_graph))
    device = device_of(recording)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        _, sites, _ = recording(chunk.to(device))
        for name, value in sites.items():
            sums[name] = sums.get(name, 0) + value.flatten(0, -2).double().sum(0).cpu()
        count += chunk.numel()
    return {name: (total / max(count, 1)).float() for name, total in sums.items()}


@torch.no_grad()
def norm_scales(model_or_graph, tokens: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Mean per-token inverse scale (1/rms or 1/std) of every norm: the frozen norm mode's constants."""
    recording = with_recordings(graph_of(model_or_graph))
    totals: dict[str, float] = {}
    count = 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        _, _, scales = recording(chunk.to(device_of(recording)))
        for name, value in scales.items():
            totals[name] = totals.get(name, 0.0) + float(value.double().sum())
        count += chunk.numel()
    return {name: float(torch.tensor(total / max(count, 1), dtype=torch.float32)) for name, total in totals.items()}


def fills_for(model_or_graph, ablation: str, means: dict | None) -> dict[str, torch.Tensor]:
    widths = site_widths(model_or_graph)
    if ablation == "zero":
        return {name: torch.zeros(width) for name, width in widths.items()}
    if ablation == "mean":
        if means is None:
            raise UserError("mean ablation needs per-site means (see circuitir.ir.ablation.site_means)")
        return {name: torch.as_tensor(means[name], dtype=torch.float32) for name in widths}
    raise UserError(f"ablation {ablation!r} has no constant stand-in values; circuits support: mean, zero")
