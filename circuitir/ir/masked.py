"""Masking as a graph rewrite: the ablated model is a new ``torch.fx.GraphModule``.

``mask_graph(graph_ir, fills)`` copies the traced graph (``ir/trace.py``) and,
after every *site* node (a ``call_module`` node whose target is a
:class:`~circuitir.models.gpt.Site`; the trace's site table names them),
inserts the node ``apply_site_mask(x, mask, fill)``, i.e. ``x*m + fill*(1-m)``.
The masks and fills are buffers of the new graph module, never attributes of
the source model, so any number of masked graphs of one model coexist and the
source ``nn.Module`` is never changed: the new module only *shares* its
parameters.

Masks carry a leading *mask-batch* dimension: with masks of shape (M, width)
the module repeats the token batch M times at its input (one inserted node
after the placeholder), every site reads its own mask row, and the output is
(M, B, T, vocab): M masks evaluated in one forward. Boolean masks select
(``torch.where``, exact); float masks interpolate (differentiable, what prune
learns through). A fill is (width,) (mean, zero) or (B, T, width) (resample:
another prompt's values).

``freeze_norms`` rewrites every norm node (the trace keeps norms as leaves)
into ``frozen_norm``, a call with a constant inverse scale: the ``frozen``
norm mode. ``with_recordings`` rewrites the output into (logits, {site:
value}, {norm: inverse scale}), which is how means and frozen scales are
measured: no hooks on the model.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from circuitir.errors import UserError
from circuitir.ir.trace import GraphIR, trace
from circuitir.models.gpt import norm_inverse_scale


# ---------------------------------------------------------------- the inserted operations
# Module-level functions: fx's generated code calls them by name.

def apply_site_mask(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``x`` (M*B, T, W), ``mask`` (M, W), ``fill`` (W,) or (B, T, W) -> ``x*m + fill*(1-m)`` per mask row."""
    rows = x.unflatten(0, (mask.shape[0], -1))  # (M, B, T, W)
    keep = mask[:, None, None, :]
    fill = fill.to(x.dtype)
    if keep.dtype == torch.bool:
        out = torch.where(keep, rows, fill)
    else:
        out = rows * keep + fill * (1 - keep)
    return out.flatten(0, 1)


def repeat_for_masks(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) tokens -> (M*B, T): one copy of the batch per mask row."""
    return tokens.repeat(mask.shape[0], 1)


def split_masks(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M*B, T, V) -> (M, B, T, V)."""
    return logits.unflatten(0, (mask.shape[0], -1))


def frozen_norm(x: torch.Tensor, weight: torch.Tensor, bias, scale: torch.Tensor, rms: bool) -> torch.Tensor:
    """A norm whose per-token inverse scale is the constant ``scale`` (linear in ``x``)."""
    if not rms:
        x = x - x.mean(-1, keepdim=True)
    out = x * scale.to(x.dtype) * weight
    return out if bias is None else out + bias


def centred_inverse_scale(x: torch.Tensor, rms: bool, eps: float) -> torch.Tensor:
    """What a live norm multiplies ``x`` by, per token (LayerNorm centres first)."""
    return norm_inverse_scale(x if rms else x - x.mean(-1, keepdim=True), rms, eps)


# ---------------------------------------------------------------- rewrites

def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live (the CPU for one with none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _key(name: str) -> str:
    return name.replace(".", "_")


def _constant(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of a leaf module whose parameters are the same storage, detached: gradients
    through a rewritten graph reach its masks, never the source model's weights."""
    clone = copy.copy(module)
    clone._parameters = {name: None if value is None else torch.nn.Parameter(value.detach(), requires_grad=False)
                         for name, value in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {name: _constant(child) for name, child in module._modules.items()}
    return clone


def _copy(graph_ir: GraphIR, cls=torch.fx.GraphModule, class_name: str = "GraphModule") -> torch.fx.GraphModule:
    """A new ``cls`` over a copy of the graph. Its modules are :func:`_constant` copies sharing the
    model's weights (no tensor is copied); the source model is neither changed nor given gradients."""
    source = graph_ir.graph_module
    graph = torch.fx.Graph()
    output = graph.graph_copy(source.graph, {})
    graph.output(output)
    root = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = _constant(source.get_submodule(node.target))
        elif node.op == "get_attr":
            value = _fetch(source, node.target)
            root[node.target] = value.detach() if isinstance(value, torch.Tensor) else value
    return cls(root, graph, class_name=class_name)


def _fetch(module: torch.nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _site_nodes(graph_module: torch.fx.GraphModule, graph_ir: GraphIR) -> dict[str, torch.fx.Node]:
    by_path = {info.module: name for name, info in graph_ir.sites.items()}
    return {by_path[node.target]: node for node in graph_module.graph.nodes
            if node.op == "call_module" and node.target in by_path}


def _rewire_after(node: torch.fx.Node, function, attributes: list[str]) -> torch.fx.Node:
    """Insert ``function(node, *attributes)`` right after ``node`` (the attributes read just before it) and
    route every other use of ``node`` through the new node."""
    graph = node.graph
    with graph.inserting_before(node):
        args = [graph.get_attr(name) for name in attributes]
    with graph.inserting_after(node):
        new = graph.call_function(function, (node, *args))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


class MaskedGraph(torch.fx.GraphModule):
    """A traced model with a mask after every site. ``site_widths`` lists the sites in forward order."""

    site_widths: dict[str, int]

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Set every site's mask: (W,) or (M, W), bool or float; a site left out keeps nothing.

        All masks must share M. Float masks may carry gradients (prune learns through them)."""
        unknown = set(masks) - set(self.site_widths)
        if unknown:
            raise UserError(f"mask names unknown site {sorted(unknown)[0]!r} "
                            f"(sites: {', '.join(self.site_widths)})")
        given = [torch.as_tensor(m) for m in masks.values()]
        rows = {1 if m.dim() == 1 else m.shape[0] for m in given} or {1}
        if len(rows) > 1:
            raise UserError(f"masks disagree on the mask-batch size: {sorted(rows)}")
        count = rows.pop()
        floating = any(m.is_floating_point() for m in given)
        dtype = torch.float32 if floating else torch.bool
        for name, width in self.site_widths.items():
            mask = torch.as_tensor(masks[name]) if name in masks else torch.zeros(width, dtype=dtype)
            if mask.shape[-1:] != (width,) or mask.dim() > 2:
                raise UserError(f"mask for {name} has shape {tuple(mask.shape)}, expected ({width},) "
                                f"or (masks, {width})")
            if not mask.is_floating_point() and mask.dtype != torch.bool:
                mask = mask.bool()
            if floating:
                mask = mask.to(torch.float32)
            self._buffers[f"mask_{_key(name)}"] = mask.reshape(-1, width).expand(count, width).to(self.device)

    def set_fills(self, fills: dict[str, torch.Tensor]) -> None:
        for name, width in self.site_widths.items():
            fill = torch.as_tensor(fills[name], dtype=torch.float32)
            if fill.shape[-1:] != (width,):
                raise UserError(f"fill for {name} has shape {tuple(fill.shape)}, expected (..., {width})")
            self._buffers[f"fill_{_key(name)}"] = fill.to(self.device)

    @property
    def device(self) -> torch.device:
        return device_of(self)

    @property
    def n_masks(self) -> int:
        return next(iter(self._buffers[f"mask_{_key(n)}"] for n in self.site_widths)).shape[0]


def mask_graph(graph_ir: GraphIR, fills: dict[str, torch.Tensor], masks: dict | None = None) -> MaskedGraph:
    """The masked graph (see the module docstring); ``masks`` default to keeping every channel."""
    module = _copy(graph_ir, MaskedGraph, "MaskedGraph")
    module.site_widths = {name: info.width for name, info in graph_ir.sites.items()}
    module.set_masks({name: torch.ones(w, dtype=torch.bool) for name, w in module.site_widths.items()})
    module.set_fills(fills)
    graph = module.graph
    sites = _site_nodes(module, graph_ir)
    first_mask = f"mask_{_key(next(iter(module.site_widths)))}"
    for name, node in sites.items():
        _rewire_after(node, apply_site_mask, [f"mask_{_key(name)}", f"fill_{_key(name)}"])
    tokens = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(tokens):  # get_attr after the placeholder, so placeholders stay first
        first = graph.get_attr(first_mask)
    with graph.inserting_after(first):
        repeated = graph.call_function(repeat_for_masks, (tokens, first))
    tokens.replace_all_uses_with(repeated, delete_user_cb=lambda user: user is not repeated)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    with graph.inserting_before(output):
        split = graph.call_function(split_masks, (logits, graph.get_attr(first_mask)))
    output.args = (split,)
    graph.lint()
    module.recompile()
    if masks is not None:
        module.set_masks(masks)
    return module


def freeze_norms(module: torch.fx.GraphModule, graph_ir: GraphIR, scales: dict[str, float]) -> torch.fx.GraphModule:
    """Rewrite every norm of ``module`` (a copy or masked graph of ``graph_ir``) to a constant scale, in place."""
    missing = set(graph_ir.norms) - set(scales)
    if missing:
        raise UserError(f"frozen norms need a scale for every norm; missing {sorted(missing)[0]!r}")
    by_path = {path: point for point, path in graph_ir.norms.items()}
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in by_path:
            continue
        point = by_path[node.target]
        norm = module.get_submodule(node.target)
        name = f"frozen_scale_{_key(point)}"
        module.register_buffer(name, torch.tensor(float(scales[point]), dtype=torch.float32))
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if norm.bias is not None else None
            frozen = graph.call_function(frozen_norm, (node.args[0], weight, bias, graph.get_attr(name), norm.rms))
        node.replace_all_uses_with(frozen)
        graph.erase_node(node)
    graph.lint()
    module.recompile()
    return module


def with_recordings(graph_ir: GraphIR) -> torch.fx.GraphModule:
    """A copy of the model whose output is (logits, {site: value}, {norm point: inverse scale})."""
    module = _copy(graph_ir, class_name="RecordingGraph")
    graph = module.graph
    sites = _site_nodes(module, graph_ir)
    by_path = {path: point for point, path in graph_ir.norms.items()}
    scales = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in by_path:
            norm = module.get_submodule(node.target)
            with graph.inserting_after(node):
                x = node.args[0]
                scales[by_path[node.target]] = graph.call_function(centred_inverse_scale, (x, norm.rms, norm.eps))
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], dict(sites), scales),)
    graph.lint()
    module.recompile()
    return module


def gather_last(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(R, T, d) -> (R, 1, d): each row at its prompt's last position; R = masks * len(last)."""
    index = last.repeat(x.shape[0] // last.shape[0])
    return x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)


def last_position_only(module: torch.fx.GraphModule, graph_ir: GraphIR) -> bool:
    """Rewrite ``module`` (in place) to compute the last MLP and the unembedding at one position per prompt.

    A task's loss reads each prompt's logits at its last token. Everything from the last MLP's norm
    on is per position, so the residual stream read there is gathered at those positions (a new
    input, ``last``: (B,) indices) and the rest runs on (B, 1, d). The module then maps
    (tokens, last) to (..., B, 1, vocab). Returns False, changing nothing, for a model whose logits
    read the tokens again (a bigram table)."""
    graph = module.graph
    if any(n.op == "get_attr" and n.target == "bigram_table" for n in graph.nodes):
        return False
    points = [p for p in graph_ir.norms if p.endswith(".mlp")]
    norm_path = graph_ir.norms[points[-1]]
    norm_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == norm_path)
    tokens = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(tokens):
        last = graph.placeholder("last")
    position = {node: i for i, node in enumerate(graph.nodes)}
    resid = norm_node.args[0]
    with graph.inserting_before(norm_node):
        gathered = graph.call_function(gather_last, (resid, last))
    resid.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered and
                                position[user] >= position[norm_node])
    graph.lint()
    module.recompile()
    return True


# ---------------------------------------------------------------- the reference every circuit is checked against

def graph_of(model_or_graph) -> GraphIR:
    return model_or_graph if isinstance(model_or_graph, GraphIR) else trace(model_or_graph)


def ablate(model_or_graph, keep: dict, fills: dict, frozen_scales: dict | None = None) -> torch.nn.Module:
    """The model with every channel outside ``keep`` ({site: bool (W,)}) replaced by ``fills``, and with
    every norm's scale frozen when ``frozen_scales`` is given: a module mapping (B, T) token ids to
    (B, T, vocab) logits. ``compile(circuit)`` must agree with it to 1e-4 (DESIGN §3)."""
    graph_ir = graph_of(model_or_graph)
    for name, mask in keep.items():
        if torch.as_tensor(mask).dim() != 1:
            raise UserError(f"ablate takes one mask per site; {name} has shape {tuple(torch.as_tensor(mask).shape)}")
    module = mask_graph(graph_ir, fills, keep)
    if frozen_scales is not None:
        freeze_norms(module, graph_ir, frozen_scales)
    return _SingleMask(module)


class _SingleMask(torch.nn.Module):
    """A masked graph with one mask: (B, T) -> (B, T, V)."""

    def __init__(self, masked: MaskedGraph):
        super().__init__()
        self.masked = masked

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.masked(tokens.to(self.masked.device))[0]
