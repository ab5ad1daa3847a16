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

    def site_nodes(self) -> dict[str, torch.fx.Node]:
        """The fx node of every site, by site name."""
        by_module = {info.module: name for name, info in self.sites.items()}
        return {by_module[node.target]: node for node in self.graph_module.graph.nodes
                if node.op == "call_module" and node.target in by_module}


# Which weight matrices read and write each kind of site (residual reads go through a norm).
READS = {"act_in": lambda L, sub: [f"transformer.h.{L}.{sub}.c_attn.weight" if sub == "attn"
                                   else f"transformer.h.{L}.mlp.c_fc.weight"],
         "v": lambda L, sub: [f"transformer.h.{L}.attn.c_proj.weight"],
         "post_act": lambda L, sub: [f"transformer.h.{L}.mlp.c_proj.weight"],
         "final_resid": lambda L, sub: ["lm_head.weight"]}
WRITES = {"q": lambda L, sub: [f"transformer.h.{L}.attn.c_attn.weight"],
          "k": lambda L, sub: [f"transformer.h.{L}.attn.c_attn.weight"],
          "v": lambda L, sub: [f"transformer.h.{L}.attn.c_attn.weight"],
          "post_act": lambda L, sub: [f"transformer.h.{L}.mlp.c_fc.weight"],
          "resid_delta": lambda L, sub: [f"transformer.h.{L}.{sub}.c_proj.weight"]}


def residual_writers(layer: int, sublayer: str) -> list[str]:
    """Everything written to the residual stream before a read: the embedding and earlier c_proj's."""
    earlier = [(L, s) for L in range(layer + 1) for s in ("attn", "mlp")
               if L < layer or (s == "attn" and sublayer == "mlp")]
    return ["transformer.wte.weight"] + [f"transformer.h.{L}.{s}.c_proj.weight" for L, s in earlier]


def trace(model) -> GraphIR:
    graph = SiteTracer().trace(model)
    graph_module = torch.fx.GraphModule(model, graph, class_name="SparseGPTGraph")
    paths = {module.name: path for path, module in model.named_modules() if isinstance(module, Site)}
    sites = {}
    for spec in site_specs(model.config.to_dict()):
        if spec.kind == "logits":
            continue
        sub = spec.sublayer
        info = SiteInfo(spec.name, spec.width, paths[spec.name])
        if spec.kind in READS:
            info.readers = READS[spec.kind](spec.layer, sub)
        if spec.kind in WRITES:
            info.writers = WRITES[spec.kind](spec.layer, sub)
        elif spec.kind in ("act_in", "final_resid"):
            info.writers = residual_writers(spec.layer, sub)
        sites[spec.name] = info
    nonzeros = {name: (int((p != 0).sum()), p.numel()) for name, p in model.sparse_parameters().items()}
    module_path = {id(module): path for path, module in model.named_modules()}
    norms = {point: module_path[id(norm)] for point, norm in model.norms().items()}
    return GraphIR(graph_module, sites, nonzeros, norms)


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
