"""diff: how two circuits differ, in structure and (given a task) in behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitir.ir.circuit import Circuit


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def _close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))


@dataclass
class CircuitDiff:
    header: list[tuple[str, object, object]] = field(default_factory=list)   # key, a, b (None = absent)
    config: list[tuple[str, object, object]] = field(default_factory=list)
    candidates: tuple | None = None
    nodes_added: list[str] = field(default_factory=list)
    nodes_removed: list[str] = field(default_factory=list)
    nodes_changed: list[tuple[str, str, object, object]] = field(default_factory=list)  # node, attribute, a, b
    edges_added: list[tuple[str, str, float]] = field(default_factory=list)
    edges_removed: list[tuple[str, str, float]] = field(default_factory=list)
    edges_changed: list[tuple[str, str, float, float]] = field(default_factory=list)
    heads_added: list[str] = field(default_factory=list)
    heads_removed: list[str] = field(default_factory=list)
    tables_changed: list[tuple[str, float]] = field(default_factory=list)   # table, max abs difference

    @property
    def equal(self) -> bool:
        return not any(getattr(self, f) for f in self.__dataclass_fields__)

    def to_dict(self) -> dict:
        return {
            "equal": self.equal,
            "header": [{"key": k, "a": a, "b": b} for k, a, b in self.header],
            "config": [{"key": k, "a": a, "b": b} for k, a, b in self.config],
            "candidates": None if self.candidates is None else {"a": self.candidates[0], "b": self.candidates[1]},
            "nodes": {"added": self.nodes_added, "removed": self.nodes_removed,
                      "changed": [{"node": n, "attribute": at, "a": a, "b": b} for n, at, a, b in self.nodes_changed]},
            "edges": {"added": [{"src": s, "dst": d, "weight": w} for s, d, w in self.edges_added],
                      "removed": [{"src": s, "dst": d, "weight": w} for s, d, w in self.edges_removed],
                      "changed": [{"src": s, "dst": d, "a": a, "b": b} for s, d, a, b in self.edges_changed]},
            "heads": {"added": self.heads_added, "removed": self.heads_removed},
            "tables": [{"table": t, "max_abs_diff": v} for t, v in self.tables_changed],
        }


def _dict_changes(a: dict, b: dict) -> list:
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def structural_diff(a: Circuit, b: Circuit, tolerance: float = 1e-6, header: bool = True) -> CircuitDiff:
    out = CircuitDiff()
    if header:
        out.header = _dict_changes(flatten(a.header), flatten(b.header))
    out.config = _dict_changes(a.config, b.config)
    if list(a.candidates) != list(b.candidates):
        out.candidates = (list(a.candidates), list(b.candidates))

    def order(nodes):
        try:  # forward order of a's sites; b may have sites a does not (another shape): then by name
            return a.sorted(nodes)
        except KeyError:
            return sorted(nodes, key=str)

    a_nodes, b_nodes = set(a.nodes), set(b.nodes)
    out.nodes_added = [str(n) for n in order(b_nodes - a_nodes)]
    out.nodes_removed = [str(n) for n in order(a_nodes - b_nodes)]
    for node in order(a_nodes & b_nodes):
        da, db = a.nodes[node], b.nodes[node]
        if da.kind != db.kind:
            out.nodes_changed.append((str(node), "kind", da.kind, db.kind))
            continue
        for attribute in ("bias", "value", "gain", "shift"):
            va, vb = getattr(da, attribute), getattr(db, attribute)
            if not _close(va, vb, tolerance):
                out.nodes_changed.append((str(node), attribute, va, vb))
    edge_key = lambda e: (str(e[0]), str(e[1]))  # noqa: E731
    for edge in sorted(set(b.edges) - set(a.edges), key=edge_key):
        out.edges_added.append((str(edge[0]), str(edge[1]), b.edges[edge]))
    for edge in sorted(set(a.edges) - set(b.edges), key=edge_key):
        out.edges_removed.append((str(edge[0]), str(edge[1]), a.edges[edge]))
    for edge in sorted(set(a.edges) & set(b.edges), key=edge_key):
        if not _close(a.edges[edge], b.edges[edge], tolerance):
            out.edges_changed.append((str(edge[0]), str(edge[1]), a.edges[edge], b.edges[edge]))
    head_name = lambda h: f"{h[0]}.attn.head[{h[1]}]"  # noqa: E731
    out.heads_added = [head_name(h) for h in sorted(set(b.heads) - set(a.heads))]
    out.heads_removed = [head_name(h) for h in sorted(set(a.heads) - set(b.heads))]
    for head in sorted(set(a.heads) & set(b.heads)):
        sa, sb = a.heads[head], b.heads[head]
        if (sa is None) != (sb is None) or (sa is not None and not _close(sa, sb, tolerance)):
            out.nodes_changed.append((head_name(head), "sink", sa, sb))
    tables = {}
    for channel in sorted(set(a.embed) | set(b.embed)):
        tables[f"embed {channel}"] = (a.embed.get(channel), b.embed.get(channel))
    for point in sorted(set(a.norms) | set(b.norms)):
        na, nb = a.norms.get(point), b.norms.get(point)
        for attribute in ("passive_sq", "passive_sum"):
            tables[f"norm {point} {attribute}"] = (getattr(na, attribute, None), getattr(nb, attribute, None))
        if na is not None and nb is not None and na.frozen_scale != nb.frozen_scale:
            out.tables_changed.append((f"norm {point} frozen", float("inf")))
    tables["bigram"] = (a.bigram, b.bigram)
    for name, (ta, tb) in tables.items():
        if ta is None and tb is None:
            continue
        if ta is None or tb is None or ta.shape != tb.shape:
            out.tables_changed.append((name, float("inf")))
            continue
        gap = float((ta - tb).abs().max()) if ta.numel() else 0.0
        if gap > tolerance * max(1.0, float(ta.abs().max()) if ta.numel() else 0.0):
            out.tables_changed.append((name, gap))
    return out


def _weight(x) -> str:
    """A weight or node attribute as the .cir file spells it (shortest float32 decimal)."""
    from circuitir.grammar.values import format_f32, is_float32
    return format_f32(x) if isinstance(x, float) and is_float32(x) else repr(x)


def format_diff(diff: CircuitDiff, name_a: str, name_b: str) -> str:
    lines = [f"--- {name_a}", f"+++ {name_b}"]

    def section(title, rows):
        if rows:
            lines.append(f"{title}:")
            lines.extend(f"  {row}" for row in rows)

    section("header", [f"~ {k}: {a!r} -> {b!r}" if a is not None and b is not None else
                       (f"+ {k} = {b!r}" if a is None else f"- {k} = {a!r}") for k, a, b in diff.header])
    section("config", [f"~ {k}: {a!r} -> {b!r}" for k, a, b in diff.config])
    if diff.candidates:
        section("candidates", [f"~ {diff.candidates[0]} -> {diff.candidates[1]}"])
    section("nodes", [f"+ {n}" for n in diff.nodes_added] + [f"- {n}" for n in diff.nodes_removed] +
            [f"~ {n} {at}: {_weight(a)} -> {_weight(b)}" for n, at, a, b in diff.nodes_changed])
    section("heads", [f"+ {h}" for h in diff.heads_added] + [f"- {h}" for h in diff.heads_removed])
    section("edges", [f"+ {s} -> {d}  {_weight(w)}" for s, d, w in diff.edges_added] +
            [f"- {s} -> {d}  {_weight(w)}" for s, d, w in diff.edges_removed] +
            [f"~ {s} -> {d}: {_weight(a)} -> {_weight(b)}" for s, d, a, b in diff.edges_changed])
    section("tables", [f"~ {t}: max |difference| {v:.3g}" for t, v in diff.tables_changed])
    if diff.equal:
        lines.append("circuits are equal")
    else:
        lines.append(f"summary: nodes +{len(diff.nodes_added)} -{len(diff.nodes_removed)} "
                     f"~{len(diff.nodes_changed)}, edges +{len(diff.edges_added)} -{len(diff.edges_removed)} "
                     f"~{len(diff.edges_changed)}, header changes {len(diff.header)}, "
                     f"tables changed {len(diff.tables_changed)}")
    return "\n".join(lines)


@torch.no_grad()
def behavioural_diff(a: Circuit, b: Circuit, task, tokenizer, n: int = 256, seed: int = 0) -> dict:
    """Task loss and per-prompt predictions of both circuits on the same held-out prompts."""
    from circuitir.runtime.evaluate import circuit_pair_logits
    from circuitir.tasks.evaluate import accuracy, binary_loss

    pa, batch = circuit_pair_logits(a, task, tokenizer, "heldout", n, seed)
    pb, _ = circuit_pair_logits(b, task, tokenizer, "heldout", n, seed)
    right_a, right_b = pa[:, 0] > pa[:, 1], pb[:, 0] > pb[:, 1]
    differing = torch.nonzero(right_a != right_b).flatten().tolist()
    return {
        "task": task.name, "n": len(batch),
        "a": {"loss": float(binary_loss(pa)), "accuracy": accuracy(pa)},
        "b": {"loss": float(binary_loss(pb)), "accuracy": accuracy(pb)},
        "predictions_differ": len(differing),
        "examples": [{"prompt": batch.prompts[i], "a_correct": bool(right_a[i]), "b_correct": bool(right_b[i])}
                     for i in differing[:5]],
        "max_abs_logit_diff": float((pa - pb).abs().max()),
    }
