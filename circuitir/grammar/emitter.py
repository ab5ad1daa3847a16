"""Circuit IR -> canonical .cir text.

The text is canonical: one fact per line, in a fixed order, so that two
circuits differ in exactly the lines where they differ.

* ``circuitir 1``, then ``header:`` and ``config:`` (``key = value`` lines in
  the dicts' order, nested dicts as dotted keys), ``candidates``, the
  ``embed`` columns by channel;
* a block per layer and sublayer in forward order (``layer 0 attn:``,
  ``layer 0 mlp:``, ..., ``final:``), empty blocks left out. In a block: the
  norm and its tables, then the nodes by site in forward order and by index,
  except that the q/k/v nodes of a declared head stand under its ``head``
  line (q/k/v constants of heads the circuit does not compute come before
  the first ``head`` line); each node is followed by its incoming edges,
  sources in forward order.
* Node attributes: the one that matters for the site always (``gain`` for
  residual reads, ``bias`` otherwise), the others only when they are not
  their default bit for bit.

Comments, when given (by :func:`circuitir.grammar.format_text`), are written
back before or at the end of the statement they were attached to; any whose
statement is gone are kept at the end of the file rather than dropped.
"""

from __future__ import annotations

from circuitir.grammar import values as V
from circuitir.grammar.schema import MAX_KEY_PARTS
from circuitir.ir.circuit import LANGUAGE_VERSION, Circuit, CircuitError, Node, read_point, site_specs

INDENT = "  "
PRIMARY_ATTR = {"act_in": "gain", "final_resid": "gain"}  # every other site: bias
ATTR_ORDER = ("bias", "value", "gain", "shift")


def emit(circuit: Circuit, comments: dict | None = None) -> str:
    """The canonical .cir text of ``circuit`` (and ``comments``, keyed as the parser attaches them)."""
    with V.gc_paused():
        return Emitter(circuit, comments or {}).text()


class Emitter:
    def __init__(self, circuit: Circuit, comments: dict):
        self.circuit = circuit
        self.comments = comments
        self.used: set = set()
        self.out: list[str] = []
        self.specs = {s.name: s for s in site_specs(circuit.config, len(circuit.candidates))}
        self.rank = {name: i for i, name in enumerate(self.specs)}
        self.check_expressible()
        self.sources: dict[Node, list[Node]] = {}
        for source, target in circuit.edges:
            self.sources.setdefault(target, []).append(source)

    def order(self, node: Node) -> tuple[int, int]:
        return self.rank[node.site], node.index

    # -- layout
    def statement(self, level: int, text: str, key: tuple | None = None, default_comment: str = "") -> None:
        indent = INDENT * level
        attached = self.comments.get(key)
        if attached is not None:
            self.used.add(key)
            self.out.extend(indent + comment for comment in attached.leading)
        trailing = " ".join(attached.trailing) if attached is not None and attached.trailing else default_comment
        self.out.append(indent + text + (f"  {trailing}" if trailing else ""))

    def blank(self) -> None:
        if self.out and self.out[-1] != "":
            self.out.append("")

    def f32(self, x: float, what: str) -> str:
        try:
            return V.format_f32(x)
        except V.ValueSpellingError as exc:
            raise CircuitError(f"{what}: {exc}") from None

    def table(self, tensor, what: str, level: int) -> str:
        try:
            values = V.table_array(tensor, what)
            return V.format_table(values, self.circuit.config["vocab_size"], INDENT * level)
        except V.ValueSpellingError as exc:
            raise CircuitError(str(exc)) from None

    # -- the file
    def text(self) -> str:
        circuit = self.circuit
        self.statement(0, f"circuitir {LANGUAGE_VERSION}", ("version",))
        if circuit.header:
            self.settings("header", circuit.header)
        self.settings("config", circuit.config)
        self.blank()
        self.statement(0, " ".join(["candidates", *map(str, circuit.candidates)]), ("candidates",),
                       self.candidate_comment())
        self.blank()
        for channel in sorted(circuit.embed):
            self.statement(0, f"embed {channel} = {self.table(circuit.embed[channel], f'embed {channel}', 0)}",
                           ("embed", channel))
        for layer in range(circuit.config["n_layer"]):
            self.block(f"layer {layer} attn", f"{layer}.attn", layer, "attn")
            self.block(f"layer {layer} mlp", f"{layer}.mlp", layer, "mlp")
        self.block("final", "final", circuit.config["n_layer"], "final")
        leftover = [key for key in self.comments if key not in self.used]
        if leftover:
            self.blank()
            for key in leftover:
                self.out.extend(self.comments[key].leading + self.comments[key].trailing)
        return "\n".join(self.out).rstrip("\n") + "\n"

    def settings(self, section: str, settings: dict) -> None:
        self.blank()
        self.statement(0, f"{section}:", ("section", section))
        for path, value in flatten(settings, section):
            try:
                text = V.format_setting(value, f"{section} {V.format_key(path)}")
            except V.ValueSpellingError as exc:
                raise CircuitError(str(exc)) from None
            self.statement(1, f"{V.format_key(path)} = {text}", ("setting", section, path))

    def candidate_comment(self) -> str:
        """The candidates as bytes, for byte-level models: a courtesy, the parser ignores it."""
        if self.circuit.config["vocab_size"] != 256 or not self.circuit.candidates:
            return ""
        return "# " + " ".join(repr(bytes([t]))[1:] for t in self.circuit.candidates)

    # -- blocks
    def block(self, title: str, point: str, layer: int, sublayer: str) -> None:
        circuit = self.circuit
        nodes = [n for n in circuit.nodes
                 if self.specs[n.site].layer == layer and self.specs[n.site].sublayer == sublayer]
        heads = sorted(h for (l, h) in circuit.heads if l == layer) if sublayer == "attn" else []
        bigram = circuit.bigram is not None and sublayer == "final"
        if not nodes and not heads and point not in circuit.norms and not bigram:
            return
        self.blank()
        self.statement(0, f"{title}:", ("block", point))
        if point in circuit.norms:
            self.norm(point)
        nodes = sorted(nodes, key=self.order)
        kinds = {n: self.specs[n.site].kind for n in nodes}
        d_head = circuit.config["d_head"]
        for node in nodes:
            if kinds[node] == "act_in":
                self.node(node, 1)
        # q/k/v channels of heads the circuit does not compute (constants at a top-k site) come before the
        # first head line, so that every q/k/v line after a `head h` line belongs to head h.
        for node in nodes:
            if kinds[node] in ("q", "k", "v") and node.index // d_head not in heads:
                self.node(node, 1)
        for head in heads:
            sink = circuit.heads[layer, head]
            text = f"head {head}" + ("" if sink is None else f" sink={self.f32(sink, f'head {head}')}")
            self.statement(1, text, ("head", layer, head))
            for node in nodes:
                if kinds[node] in ("q", "k", "v") and node.index // d_head == head:
                    self.node(node, 2)
        for node in nodes:
            if kinds[node] not in ("act_in", "q", "k", "v"):
                self.node(node, 1)
        if bigram:
            for k in range(circuit.bigram.shape[1]):
                table = self.table(circuit.bigram[:, k], f"bigram logits[{k}]", 1)
                self.statement(1, f"bigram logits[{k}] = {table}", ("bigram", k))

    def norm(self, point: str) -> None:
        norm = self.circuit.norms[point]
        text = f"norm {point} {'rms' if norm.rms else 'layernorm'} eps={self.f32(norm.eps, f'norm {point}')}"
        text += f" width={int(norm.width)}"
        if norm.frozen_scale is not None:
            text += f" frozen={self.f32(norm.frozen_scale, f'norm {point}')}"
        self.statement(1, text, ("norm", point))
        for name in ("passive_sq", "passive_sum"):
            table = getattr(norm, name)
            if table is not None:
                self.statement(2, f"{name} = {self.table(table, f'norm {point} {name}', 2)}",
                               ("norm_table", point, name))

    def node(self, node: Node, level: int) -> None:
        data = self.circuit.nodes[node]
        what = f"node {node}"
        if data.kind == "const":
            text = f"const {node} = {self.f32(data.value, what)}"
            primary = None
        else:
            text = str(node)
            primary = PRIMARY_ATTR.get(self.specs[node.site].kind, "bias")
        for name in ATTR_ORDER:
            if name == "value" and data.kind == "const":
                continue
            value = getattr(data, name)
            if name == primary or not V.is_default(value, getattr(type(data), name)):
                text += f" {name}={self.f32(value, what)}"
        self.statement(level, text, ("node", node))
        label = self.circuit.labels.get(node)
        if label is not None:
            auto = "auto " if label.source == "auto" else ""
            self.statement(level + 1, f"label {auto}{V.format_setting(label.text, f'label of {node}')}",
                           ("label", node))
        for source in sorted(self.sources.get(node, ()), key=self.order):
            weight = self.f32(self.circuit.edges[source, node], f"edge {source} -> {node}")
            self.statement(level + 1, f"<- {source} {weight}", ("edge", source, node))

    # -- what the language cannot say
    def check_expressible(self) -> None:
        circuit = self.circuit
        for node, data in circuit.nodes.items():
            if node.site not in self.specs:
                raise CircuitError(f"node {node}: unknown site {node.site!r}, cannot be written")
            expected = ("output",) if node.site == "logits" else ("kept", "const")
            if data.kind not in expected:
                raise CircuitError(f"node {node}: a {data.kind!r} node at {node.site} cannot be written "
                                   f"(expected {' or '.join(expected)})")
        for (source, target) in circuit.edges:
            if target not in circuit.nodes:
                raise CircuitError(f"edge {source} -> {target}: {target} is not a node, the edge cannot be written")
            if source.site not in self.specs:
                raise CircuitError(f"edge {source} -> {target}: unknown site {source.site!r}")
        for node, label in circuit.labels.items():
            if node not in circuit.nodes or circuit.nodes[node].kind == "const":
                raise CircuitError(f"label of {node}: only kept nodes and outputs can carry a label")
            if label.source not in ("hand", "auto") or not isinstance(label.text, str):
                raise CircuitError(f"label of {node}: expected text and a source 'hand' or 'auto', got {label!r}")
        for (layer, head) in circuit.heads:
            if not 0 <= layer < circuit.config["n_layer"]:
                raise CircuitError(f"head {layer}.attn.head[{head}]: layer {layer} does not exist")
        points = {read_point(s.name) for s in self.specs.values() if s.kind in ("act_in", "final_resid")}
        for name in circuit.norms:
            if name not in points:
                raise CircuitError(f"norm {name!r}: not a norm of this model (norms: {', '.join(sorted(points))})")
        if circuit.bigram is not None and circuit.bigram.dim() != 2:
            raise CircuitError(f"bigram: expected a (vocab, n_candidates) table, got shape "
                               f"{tuple(circuit.bigram.shape)}")


def flatten(settings: dict, section: str, prefix: tuple = ()):
    """``{"a": {"b": 1}}`` -> ``(("a", "b"), 1)``: nested dicts as dotted keys, empty ones as ``{}``."""
    for key, value in settings.items():
        if not isinstance(key, str):
            raise CircuitError(f"{section}: key {key!r} under {V.format_key(prefix) or section} is not a string")
        path = prefix + (key,)
        if len(path) > MAX_KEY_PARTS:
            raise CircuitError(f"{section}: {V.format_key(path[:3])}...: settings nested more than {MAX_KEY_PARTS} "
                               f"deep cannot be written")
        if isinstance(value, dict) and value:
            yield from flatten(value, section, path)
        else:
            yield path, value
