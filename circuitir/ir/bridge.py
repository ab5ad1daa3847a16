"""The ``bridge`` pass: hybrid graphs spliced from two traced models at a sublayer boundary.

A *boundary* is a norm point of the model (``{L}.attn``, ``{L}.mlp``, ``final``):
the residual stream just before that norm reads it (before each attention,
before each MLP, and the final residual before ``ln_f``). In the traced graph
(``ir/trace.py``) it is the node feeding the norm's ``call_module`` node.

``hybrid(src_ir, dst_ir, point, bridge)`` builds one new ``GraphModule``: the
source model's graph up to its residual node at ``point``, one ``call_module``
node for the bridge map, then the destination model's graph from that
boundary on, with every use of its own residual node (the norm's read *and*
the residual addition) replaced by the bridge's output. Dead prefix nodes of
the destination are removed. Module and attribute paths are prefixed
``src.`` / ``dst.``; the modules are the :func:`~circuitir.ir.masked._constant`
copies the house rewrites use (``live=True`` shares the modules themselves, for
training through a hybrid), so neither source model is changed.

``residuals(ir)`` rewrites the output into ``(logits, {point: residual})`` and
``suffix(ir, point)`` turns the residual node into a second placeholder
``(idx, h) -> logits``; ``hybrid`` equals ``suffix(dst)(idx, bridge(residuals(src)(idx)[1][point]))``
(a test checks it), which is how training evaluates every boundary from one
prefix pass.
"""

from __future__ import annotations

import torch
import torch.fx

from circuitir.errors import UserError
from circuitir.ir.masked import _constant, _fetch
from circuitir.ir.trace import GraphIR


def boundaries(config) -> list[str]:
    """The sublayer boundaries of a model, in forward order."""
    return [f"{layer}.{sub}" for layer in range(config.n_layer) for sub in ("attn", "mlp")] + ["final"]


def residual_node(graph_module: torch.fx.GraphModule, graph_ir: GraphIR, point: str) -> torch.fx.Node:
    """The node holding the residual stream that the norm at ``point`` reads."""
    if point not in graph_ir.norms:
        raise UserError(f"unknown boundary {point!r} (known: {', '.join(graph_ir.norms)})")
    path = graph_ir.norms[point]
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target == path:
            return node.args[0]
    raise UserError(f"boundary {point!r}: no norm node {path!r} in the traced graph")


def _copy_into(graph: torch.fx.Graph, source: torch.fx.GraphModule, prefix: str, env: dict, root: dict,
               live: bool, stop: torch.fx.Node | None = None) -> None:
    """Copy ``source``'s nodes (up to and including ``stop``) into ``graph``; nodes already in ``env``
    (placeholders, substituted residuals) are not copied."""
    for node in source.graph.nodes:
        if node.op == "output" or node in env:
            if node is stop:
                return
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            new.target = f"{prefix}.{node.target}"
            value = _fetch(source, node.target)
            if node.op == "call_module":
                root[new.target] = value if live else _constant(value)
            else:
                root[new.target] = value if live or not isinstance(value, torch.Tensor) else value.detach()
        env[node] = new
        if node is stop:
            return


def _placeholder(graph_module: torch.fx.GraphModule) -> torch.fx.Node:
    (node,) = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    return node


def _output_arg(graph_module: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in graph_module.graph.nodes if n.op == "output").args[0]


def _finish(root: dict, graph: torch.fx.Graph, class_name: str) -> torch.fx.GraphModule:
    module = torch.fx.GraphModule(root, graph, class_name=class_name)
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


def hybrid(src_ir: GraphIR, dst_ir: GraphIR, point: str, bridge: torch.nn.Module | None,
           live: bool = False) -> torch.fx.GraphModule:
    """``src`` prefix -> ``bridge`` at ``point`` -> ``dst`` suffix, one GraphModule ``idx -> logits``.
    ``bridge=None`` splices with no map (the identity; both models must have the same width)."""
    src, dst = src_ir.graph_module, dst_ir.graph_module
    graph, root, env = torch.fx.Graph(), {}, {}
    idx = graph.placeholder("idx")
    env[_placeholder(src)] = idx
    h_src = residual_node(src, src_ir, point)
    _copy_into(graph, src, "src", env, root, live, stop=h_src)
    crossed = env[h_src]
    if bridge is not None:
        root["bridge"] = bridge if live else _constant(bridge)
        crossed = graph.call_module("bridge", (crossed,))
    dst_env = {_placeholder(dst): idx, residual_node(dst, dst_ir, point): crossed}
    _copy_into(graph, dst, "dst", dst_env, root, live)
    graph.output(dst_env[_output_arg(dst)])
    return _finish(root, graph, "HybridGraph")


def residuals(graph_ir: GraphIR, live: bool = False) -> torch.fx.GraphModule:
    """``idx -> (logits, {point: residual stream at point})``."""
    source = graph_ir.graph_module
    graph, root, env = torch.fx.Graph(), {}, {}
    env[_placeholder(source)] = graph.placeholder("idx")
    _copy_into(graph, source, "model", env, root, live)
    points = {point: env[residual_node(source, graph_ir, point)] for point in graph_ir.norms}
    graph.output((env[_output_arg(source)], points))
    return _finish(root, graph, "ResidualsGraph")


def suffix(graph_ir: GraphIR, point: str, live: bool = False) -> torch.fx.GraphModule:
    """``(idx, h) -> logits``: the model from boundary ``point`` on, reading the residual ``h``."""
    source = graph_ir.graph_module
    graph, root = torch.fx.Graph(), {}
    env = {_placeholder(source): graph.placeholder("idx")}
    env[residual_node(source, graph_ir, point)] = graph.placeholder("h")
    _copy_into(graph, source, "model", env, root, live)
    graph.output(env[_output_arg(source)])
    return _finish(root, graph, "SuffixGraph")
