"""Graph IR: the model traced with torch.fx, sites and norms kept as leaves.

``trace(model)`` returns a :class:`GraphIR`: a ``torch.fx.GraphModule`` in
which every site and every norm is one ``call_module`` node, a site table
(each site's name, width, module path, and the weight matrices that read and
write it) and a norm table (norm point -> module path). Every later pass
finds what it rewrites through these tables: masking inserts a node after
each site node (``ir/masked.py``), freezing replaces each norm node.
The GraphModule shares the model's parameters; no pass mutates the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from circuitir.ir.circuit import site_specs
from circuitir.ir.topology import (EMBED, RESIDUAL_READS, RESIDUAL_WRITES, SITES, UNEMBED, matrices_from,
                                   matrices_into, matrix_name)
from circuitir.models.gpt import Norm, Site


class SiteTracer(torch.fx.Tracer):
    """Keeps sites and norms opaque: a site is a place, a norm has a mode the runtime switches."""

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (Site, Norm)) or super().is_leaf_module(module, qualified_name)


@dataclass
class SiteInfo:
    name: str
    width: int
    module: str                       # qualified module path in the model
    readers: list[str] = field(default_factory=list)   # weight matrices reading this site
    writers: list[str] = field(default_factory=list)   # weight matrices writing it


@dataclass
class GraphIR:
    graph_module: torch.fx.GraphModule
    sites: dict[str, SiteInfo]
    nonzeros: dict[str, tuple[int, int]]  # matrix -> (nonzero, total)
    norms: dict[str, str] = field(default_factory=dict)  # norm point ({L}.attn, {L}.mlp, final) -> module path
    config: object = None  # the model's GPTConfig

    def site_nodes(self) -> dict[str, torch.fx.Node]:
        """The fx node of every site, by site name."""
        by_module = {info.module: name for name, info in self.sites.items()}
        return {by_module[node.target]: node for node in self.graph_module.graph.nodes
                if node.op == "call_module" and node.target in by_module}


def readers_and_writers(spec) -> tuple[list[str], list[str]]:
    """The weight matrices reading and writing a site (residual reads: everything written before them)."""
    if spec.kind == "final_resid":
        return [UNEMBED], residual_writers(spec.layer, "final")
    readers = list(dict.fromkeys(matrix_name(spec.layer, m) for m in matrices_from(spec.sublayer, spec.kind)))
    if spec.kind in RESIDUAL_READS:
        return readers, residual_writers(spec.layer, spec.sublayer)
    return readers, list(dict.fromkeys(matrix_name(spec.layer, m) for m in matrices_into(spec.sublayer, spec.kind)))


def residual_writers(layer: int, sublayer: str) -> list[str]:
    """Everything written to the residual stream before a read: the embedding and earlier writes."""
    order = [(L, rule.sublayer) for L in range(layer + 1) for rule in SITES if rule.kind in RESIDUAL_WRITES]
    before = [(L, s) for L, s in order if L < layer or (s == "attn" and sublayer == "mlp")]
    return [EMBED] + [matrix_name(L, m) for L, s in before for m in matrices_into(s, "resid_delta")]


def trace(model) -> GraphIR:
    graph = SiteTracer().trace(model)
    graph_module = torch.fx.GraphModule(model, graph, class_name="SparseGPTGraph")
    paths = {module.name: path for path, module in model.named_modules() if isinstance(module, Site)}
    sites = {}
    for spec in site_specs(model.config.to_dict()):
        if spec.kind == "logits":
            continue
        readers, writers = readers_and_writers(spec)
        sites[spec.name] = SiteInfo(spec.name, spec.width, paths[spec.name], readers, writers)
    nonzeros = {name: (int((p != 0).sum()), p.numel()) for name, p in model.sparse_parameters().items()}
    module_path = {id(module): path for path, module in model.named_modules()}
    norms = {point: module_path[id(norm)] for point, norm in model.norms().items()}
    return GraphIR(graph_module, sites, nonzeros, norms, model.config)


def summary(model, graph_ir: GraphIR | None = None) -> dict:
    """What `circuitir trace` prints: layers, sites with widths, nonzero weights per matrix."""
    graph_ir = graph_ir or trace(model)
    config = model.config
    return {
        "config": config.to_dict(),
        "layers": config.n_layer,
        "fx_nodes": len(list(graph_ir.graph_module.graph.nodes)),
        "sites": [{"site": s.name, "channels": s.width, "read_by": s.readers, "written_by": s.writers}
                  for s in graph_ir.sites.values()],
        "matrices": [{"matrix": name, "nonzero": nz, "total": total, "density": nz / total}
                     for name, (nz, total) in graph_ir.nonzeros.items()],
    }
