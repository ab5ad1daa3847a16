""".cir text -> Circuit IR.

Three steps, each with one job:

1. lark parses the text with ``circuit.lark`` (LALR, contextual lexer, line
   and column on every token); a syntax error becomes a
   :class:`CirSyntaxError` naming what was expected, in words.
2. :class:`ToStatements` (one method per grammar rule) turns the tree into
   plain statement records that keep their tokens, hence their positions.
3. :class:`Builder` assembles the :class:`~circuitir.ir.circuit.Circuit`,
   checking what a grammar cannot (known sites, widths, duplicates, declared
   nodes, table lengths, head membership), then runs
   :func:`~circuitir.ir.circuit.check_circuit` and points any broken
   invariant at the statement it names.

Comments never reach the IR. :func:`parse_with_comments` also returns them,
attached to the statement they precede or end (see :mod:`.emitter`), so the
formatter keeps them.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, VisitError

from circuitir.errors import UserError
from circuitir.grammar import schema as S
from circuitir.grammar import values as V
from circuitir.ir.circuit import (
    LANGUAGE_VERSION, Circuit, CircuitError, Label, Node, NodeData, NormData, check_circuit, parse_node, read_point,
    site_specs,
)
from circuitir.models.gpt import topk_k

GRAMMAR_PATH = Path(__file__).with_name("circuit.lark")
REQUIRED_CONFIG = ("n_layer", "n_head", "d_head", "d_model", "d_mlp", "vocab_size")
NODE_ATTRS = ("bias", "value", "gain", "shift")
CONST_ATTRS = ("bias", "gain", "shift")
NODE_DEFAULTS = {"bias": 0.0, "value": 0.0, "gain": 1.0, "shift": 0.0}

# What the parser expected, in words, by terminal name (string terminals read as themselves).
TERMINAL_WORDS = {
    "_NL": "end of line",
    "$END": "end of file",
    "NODE": "a node such as 0.attn.q[3]",
    "EDGES": "`<-`",  # well-formed edge lines; where they may stand, so may `<-`
    "NUMBER": "a number",
    "INT": "a whole number",
    "STRING": 'a "string"',
    "KEY_EQ": "a setting `key = value`",
    "ATTR": "an attribute such as bias=0.5",
    "F32": 'a table f32"..."',
    "NORM_NAME": "a norm name such as 0.attn or final",
    "NORM_KIND": "`rms` or `layernorm`",
    "SUBLAYER": "`attn` or `mlp`",
    "TABLE_NAME": "`passive_sq` or `passive_sum`",
    "LABEL_SOURCE": "`auto`",
}


class CirSyntaxError(UserError):
    """Bad .cir text. ``str()`` is ``file:line:col: message``, the line, a caret under the column,
    and (for syntax errors) what was expected there."""

    def __init__(self, message: str, filename: str, line: int, column: int, source_line: str,
                 expected: tuple[str, ...] = ()):
        self.message, self.filename, self.line, self.column = message, filename, line, column
        self.source_line, self.expected = source_line, tuple(expected)
        super().__init__(self.report())

    def report(self) -> str:
        text = self.source_line.rstrip("\r\n")
        caret = "".join(c if c == "\t" else " " for c in text[:self.column - 1]).ljust(self.column - 1) + "^"
        out = [f"{self.filename}:{self.line}:{self.column}: {self.message}", text, caret]
        if self.expected:
            out.append("expected " + _one_of(self.expected))
        return "\n".join(out)


def _one_of(words) -> str:
    words = list(words)
    if len(words) == 1:
        return words[0]
    return "one of: " + ", ".join(words)


# ---------------------------------------------------------------- statements

@dataclass
class Pos:
    line: int
    column: int

    @classmethod
    def of(cls, token: Token) -> "Pos":
        return cls(token.line, token.column)


@dataclass
class Setting:
    key: Token
    path: tuple[str, ...]
    value: object


@dataclass
class Section:
    name: str
    pos: Pos
    settings: list[Setting]


@dataclass
class Table:
    pos: Pos
    end_line: int
    entries: list[tuple[Token, Token]] | None = None  # sparse
    block: Token | None = None                       # dense f32"..."


@dataclass
class Attr:
    token: Token
    name: str
    number: Token


class Edge:
    """``<- source weight`` on one line (plain fields: a large file has hundreds of thousands)."""
    __slots__ = ("source", "line", "column", "weight", "weight_column")

    def __init__(self, source: str, line: int, column: int, weight: str, weight_column: int):
        self.source, self.line, self.column, self.weight, self.weight_column = (source, line, column, weight,
                                                                                weight_column)

    def __eq__(self, other) -> bool:
        return isinstance(other, Edge) and all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    def __repr__(self) -> str:
        return f"Edge({', '.join(repr(getattr(self, f)) for f in self.__slots__)})"


@dataclass
class LabelStmt:
    pos: Pos
    text: str
    source: str  # "hand" or "auto"


@dataclass
class NodeStmt:
    node: Token
    attrs: list[Attr]
    edges: list[Edge]
    const_value: Token | None = None
    label: LabelStmt | None = None


@dataclass
class HeadStmt:
    pos: Pos
    index: Token
    attrs: list[Attr]


@dataclass
class NormTable:
    name: Token
    table: Table


@dataclass
class NormStmt:
    pos: Pos
    name: Token
    kind: Token
    attrs: list[Attr]
    tables: list[NormTable]


@dataclass
class BigramStmt:
    pos: Pos
    node: Token
    table: Table


@dataclass
class Block:
    pos: Pos
    layer: Token | None  # None for the final block
    sublayer: str
    statements: list

    @property
    def point(self) -> str:
        return "final" if self.layer is None else f"{int(self.layer)}.{self.sublayer}"

    @property
    def title(self) -> str:
        return "final" if self.layer is None else f"layer {int(self.layer)} {self.sublayer}"


@dataclass
class Version:
    pos: Pos
    number: Token


@dataclass
class Candidates:
    pos: Pos
    tokens: list[Token]


@dataclass
class Embed:
    pos: Pos
    channel: Token
    table: Table


@v_args(meta=True)
class ToStatements(Transformer):
    """The lark tree as statement records: one method per grammar rule (each gets the rule's meta,
    whose line and column locate statements that start with a keyword the tree drops)."""

    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    # -- file and settings
    def start(self, meta, children):
        return children

    def version(self, meta, children):
        return Version(Pos.of(children[0]), children[0])

    def header(self, meta, children):
        return Section("header", Pos(meta.line, meta.column), children)

    def config(self, meta, children):
        return Section("config", Pos(meta.line, meta.column), children)

    def setting(self, meta, children):
        key, value = children
        try:
            path = V.parse_key(key)
        except V.ValueSpellingError as exc:
            self.fail(Pos.of(key), str(exc))
        if len(path) > S.MAX_KEY_PARTS:
            self.fail(Pos.of(key), f"a key of {len(path)} parts; circuitir's limit is {S.MAX_KEY_PARTS}")
        return Setting(key, path, value)

    def number(self, meta, children):
        return V.parse_number_setting(children[0])

    def string(self, meta, children):
        try:
            return V.parse_string(children[0])
        except V.ValueSpellingError as exc:
            self.fail(Pos.of(children[0]), str(exc))

    def true(self, meta, children):
        return True

    def false(self, meta, children):
        return False

    def null(self, meta, children):
        return None

    def list(self, meta, children):
        return list(children)

    def empty_dict(self, meta, children):
        return {}

    # -- the circuit
    def candidates(self, meta, children):
        return Candidates(Pos(meta.line, meta.column), children)

    def embed(self, meta, children):
        channel, table = children
        return Embed(Pos(meta.line, meta.column), channel, table)

    def layer_block(self, meta, children):
        layer, sublayer, *statements = children
        return Block(Pos(meta.line, meta.column), layer, str(sublayer), statements)

    def final_block(self, meta, children):
        return Block(Pos(meta.line, meta.column), None, "final", children)

    def norm(self, meta, children):
        name, kind, *rest = children
        attrs = [c for c in rest if isinstance(c, Attr)]
        tables = [c for c in rest if isinstance(c, NormTable)]
        return NormStmt(Pos(meta.line, meta.column), name, kind, attrs, tables)

    def norm_table(self, meta, children):
        return NormTable(*children)

    def head(self, meta, children):
        index, *attrs = children
        return HeadStmt(Pos(meta.line, meta.column), index, attrs)

    def node(self, meta, children):
        node, *rest = _flat(children)
        labels = [c for c in rest if isinstance(c, LabelStmt)]
        return NodeStmt(node, [c for c in rest if isinstance(c, Attr)], [c for c in rest if isinstance(c, Edge)],
                        label=labels[0] if labels else None)

    def label(self, meta, children):
        *source, text = children
        try:
            words = V.parse_string(text)
        except V.ValueSpellingError as exc:
            self.fail(Pos.of(text), str(exc))
        return LabelStmt(Pos(meta.line, meta.column), words, "auto" if source else "hand")

    def const(self, meta, children):
        node, value, *rest = _flat(children)
        return NodeStmt(node, [c for c in rest if isinstance(c, Attr)], [c for c in rest if isinstance(c, Edge)],
                        const_value=value)

    def edge(self, meta, children):
        source, weight = children
        return Edge(str(source), source.line, source.column, str(weight), weight.column)

    def edges(self, meta, children):
        """An EDGES token (a run of well-formed edge lines): its edges, their parts located, read with
        one regex."""
        token = children[0]
        out = []
        line, scanned = token.line, 0
        for match in EDGE_LINE_RE.finditer(token):
            start = match.start()
            line += token.count("\n", scanned, start)
            scanned = start
            newline = token.rfind("\n", 0, start)
            line_start = newline + 1 if newline >= 0 else 1 - token.column  # offset of the line's column 1
            weight = match["weight"]
            if len(weight) > S.MAX_NUMBER_CHARS:
                self.fail(Pos(line, match.start("weight") - line_start + 1),
                          f"a number of {len(weight)} characters; circuitir's limit is {S.MAX_NUMBER_CHARS}")
            out.append(Edge(match["node"], line, match.start("node") - line_start + 1, weight,
                            match.start("weight") - line_start + 1))
        return out

    def bigram(self, meta, children):
        node, table = children
        return BigramStmt(Pos(meta.line, meta.column), node, table)

    def attr(self, meta, children):
        token, number = children
        return Attr(token, token.rstrip(" \t=").strip(), number)

    def sparse(self, meta, children):
        return Table(Pos(meta.line, meta.column), meta.end_line, entries=children)

    def dense(self, meta, children):
        token = children[0]
        return Table(Pos.of(token), token.end_line, block=token)

    def entry(self, meta, children):
        return tuple(children)

    def sparse_text(self, meta, children):
        """A SPARSE token (a whole well-formed table): its entries as (INT, NUMBER) tokens with their
        positions, read with one regex."""
        token = children[0]
        entries = []
        line, line_start = token.line, -(token.column - 1)  # offset in the token where the line starts
        scanned = 0
        for match in SPARSE_PART_RE.finditer(token):
            if match["comment"] is not None:
                continue
            start = match.start()
            newlines = token.count("\n", scanned, start)
            if newlines:
                line += newlines
                line_start = token.rfind("\n", scanned, start) + 1
            scanned = start
            pair = []
            for group, kind in (("index", "INT"), ("value", "NUMBER")):
                offset = match.start(group)
                part = Token(kind, match[group], start_pos=token.start_pos + offset, line=line,
                             column=offset - line_start + 1)
                if len(part) > S.MAX_NUMBER_CHARS:
                    self.fail(Pos.of(part), f"a number of {len(part)} characters; circuitir's limit is "
                                            f"{S.MAX_NUMBER_CHARS}")
                pair.append(part)
            entries.append(tuple(pair))
        return Table(Pos.of(token), token.end_line, entries=entries)


# ---------------------------------------------------------------- lark

# Inside an EDGES token (it matched, so every line is a well-formed edge).
EDGE_LINE_RE = re.compile(r"<-[ \t]*(?P<node>[^ \t]+?\])[ \t]*(?P<weight>[^\s#]+)")
# Inside a SPARSE token: comments (skipped) and `index: value` entries (the token matched, so they are well formed).
SPARSE_PART_RE = re.compile(r"(?P<comment>#[^\n]*)|(?P<index>[0-9]+)[ \t]*:[ \t]*(?P<value>[^\s,}#]+)")

_local = threading.local()


def _flat(children: list) -> list:
    """A statement's children with the edge lists of EDGES tokens spliced in."""
    return [c for child in children for c in (child if isinstance(child, list) else (child,))]


def _collect_comment(token: Token) -> Token:
    sink = getattr(_local, "comments", None)
    if sink is not None:
        sink.append(token)
    if token.type == "_NL":
        _local.depth = 0
    return token


def _inner_comments(token: Token) -> Token:
    """The comments inside a SPARSE or EDGES token, as COMMENT tokens (the formatter keeps them)."""
    sink = getattr(_local, "comments", None)
    if sink is not None and "#" in token:
        for match in re.finditer(r"#[^\n]*", token):
            line = token.line + token.count("\n", 0, match.start())
            line_start = token.rfind("\n", 0, match.start()) + 1
            column = match.start() - line_start + 1 if line_start else token.column + match.start()
            sink.append(Token("COMMENT", match[0], start_pos=token.start_pos + match.start(), line=line,
                              column=column))
    return token


def _too_long(token: Token) -> Token:
    """Numbers and keys have a length limit, checked as they are read (``int()`` of a 5,000-digit number
    raises, a key of 20,000 parts nests 20,000 dictionaries)."""
    limit = S.MAX_NUMBER_CHARS if token.type in ("INT", "NUMBER") else S.MAX_TOKEN_CHARS
    if len(token) > limit:
        what = "a number" if token.type in ("INT", "NUMBER") else "a key"
        _local.builder.fail(Pos.of(token), f"{what} of {len(token)} characters; circuitir's limit is {limit}")
    return token


def _open_list(token: Token) -> Token:
    """Lists nest at most MAX_NESTING deep, counted as they are read: the tree is never deeper than that."""
    _local.depth = getattr(_local, "depth", 0) + 1
    if _local.depth > S.MAX_NESTING:
        _local.builder.fail(Pos.of(token), f"lists nested more than {S.MAX_NESTING} deep")
    return token


def _close_list(token: Token) -> Token:
    _local.depth = max(getattr(_local, "depth", 0) - 1, 0)
    return token


_LARK = None


def _lark() -> Lark:
    global _LARK
    if _LARK is None:
        _LARK = Lark(GRAMMAR_PATH.read_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                     maybe_placeholders=False,
                     lexer_callbacks={"COMMENT": _collect_comment, "_NL": _collect_comment, "INT": _too_long,
                                      "NUMBER": _too_long, "KEY_EQ": _too_long, "LSQB": _open_list,
                                      "RSQB": _close_list, "SPARSE": _inner_comments,
                                      "EDGES": _inner_comments})
    return _LARK


def _describe_expected(names) -> tuple[str, ...]:
    terminals = {t.name: t for t in _lark().terminals}
    words = set()
    for name in names:
        if name in TERMINAL_WORDS:
            words.add(TERMINAL_WORDS[name])
        elif name in terminals and type(terminals[name].pattern).__name__ == "PatternStr":
            words.add(f"`{terminals[name].pattern.value}`")
        else:
            words.add(name.lower())
    return tuple(sorted(words, key=lambda w: (not w.startswith("`"), w)))


# ---------------------------------------------------------------- comments

@dataclass
class Comments:
    """Comments attached to one statement: own lines before it, and at the end of its line."""
    leading: list[str] = field(default_factory=list)
    trailing: list[str] = field(default_factory=list)


def _comment_lines(tokens: list[Token]) -> list[tuple[int, int, str]]:
    """(line, column, text) of every comment, from COMMENT tokens and the comment lines inside newlines."""
    out = []
    for token in tokens:
        if token.type == "COMMENT":
            out.append((token.line, token.column, token.value.rstrip()))
            continue
        for offset, segment in enumerate(token.value.split("\n")[1:], start=1):
            body = segment.lstrip(" \t")
            if body.startswith("#"):
                out.append((token.line + offset, len(segment) - len(body) + 1, body.rstrip()))
    return out


def _attach_comments(tokens, anchors, lines) -> dict:
    """Attach each comment to a statement (anchors: (first line, last line, key)).

    A comment inside a statement's lines (a table's) belongs to it: at its end when code precedes the
    comment on its line, before it otherwise. Any other comment belongs before the next statement.
    """
    anchors = sorted(anchors, key=lambda a: (a[0], a[1]))
    starts = [a[0] for a in anchors]
    covering = {line: key for first, last, key in anchors for line in range(first, last + 1)}
    attached: dict = {}
    for line, column, text in _comment_lines(tokens):
        if line in covering:
            target = attached.setdefault(covering[line], Comments())
            own_line = not lines[line - 1][:column - 1].strip()
            (target.leading if own_line else target.trailing).append(text)
            continue
        following = bisect.bisect_right(starts, line)
        key = anchors[following][2] if following < len(anchors) else ("end",)
        attached.setdefault(key, Comments()).leading.append(text)
    return attached


# ---------------------------------------------------------------- building

class Builder:
    def __init__(self, text: str, filename: str, runnable: bool = True):
        self.filename = filename
        self.runnable = runnable
        self.lines = text.split("\n")
        self.anchors: list[tuple[int, int, tuple]] = []
        self.node_pos: dict[Node, Pos] = {}
        self.edge_pos: dict[tuple[Node, Node], Pos] = {}
        self.head_pos: dict[tuple[int, int], Pos] = {}
        self.embed_pos: dict[int, Pos] = {}
        self.norm_pos: dict[str, Pos] = {}
        self.norm_width_pos: dict[str, Pos] = {}
        self.bigram_pos: dict[int, Pos] = {}
        self.candidates_pos = Pos(1, 1)
        self.bigram_columns: dict[int, torch.Tensor] = {}
        self.version_pos = Pos(1, 1)

    # -- errors
    def fail(self, pos: Pos, message: str, expected=()):
        line = min(max(pos.line, 1), len(self.lines))
        raise CirSyntaxError(message, self.filename, line, max(pos.column, 1), self.lines[line - 1], expected) from None

    def anchor(self, first: int, last: int, key: tuple) -> None:
        self.anchors.append((first, last, key))

    def f32(self, token: Token) -> float:
        try:
            return V.parse_f32(token)
        except V.ValueSpellingError as exc:
            self.fail(Pos.of(token), str(exc))

    # -- the file
    def build(self, records: list) -> Circuit:
        version = records[0]
        self.version_pos = version.pos
        self.anchor(version.pos.line, version.pos.line, ("version",))
        sections = {r.name: r for r in records if isinstance(r, Section)}
        header = self.settings(sections["header"]) if "header" in sections else {}
        config = self.settings(sections["config"])
        self.check_config(sections["config"], config)
        if "header" in sections:
            S.check_header(header, lambda path, message: self.fail_setting(sections["header"], path, message))
        self.check_table_budget(records, config["vocab_size"])
        candidates_record = next(r for r in records if isinstance(r, Candidates))
        candidates = self.candidates(candidates_record, config)
        self.specs = {s.name: s for s in site_specs(config, len(candidates))}
        self.checked_nodes: dict[str, Node] = {}
        circuit = Circuit(config=config, candidates=candidates, header=header)
        for record in records:
            if isinstance(record, Embed):
                self.embed(record, circuit)
        blocks = [r for r in records if isinstance(r, Block)]
        for block in blocks:
            self.block_header(block, circuit)
        declared_heads = {(int(b.layer), int(s.index)) for b in blocks if b.sublayer == "attn"
                          for s in b.statements if isinstance(s, HeadStmt)}
        for block in blocks:
            self.block(block, circuit, declared_heads)
        self.check_edges(circuit)
        self.check_bigram(circuit)
        self.check(circuit)
        if self.runnable:
            self.check_runnable(circuit, sections["config"], blocks)
        return circuit

    def settings(self, section: Section) -> dict:
        self.anchor(section.pos.line, section.pos.line, ("section", section.name))
        out: dict = {}
        seen: dict[tuple, int] = {}
        for setting in section.settings:
            self.anchor(setting.key.line, setting.key.line, ("setting", section.name, setting.path))
            pos = Pos.of(setting.key)
            where = out
            for depth, part in enumerate(setting.path[:-1]):
                prefix = setting.path[:depth + 1]
                if part not in where:
                    where[part] = {}
                elif not isinstance(where[part], dict):
                    self.fail(pos, f"{V.format_key(prefix)} is a value (line {seen[prefix]}), not a group of "
                                   f"settings")
                seen.setdefault(prefix, setting.key.line)
                where = where[part]
            last = setting.path[-1]
            if last in where:
                self.fail(pos, f"duplicate setting {V.format_key(setting.path)} (first set at line "
                               f"{seen[setting.path]})")
            where[last] = setting.value
            seen[setting.path] = setting.key.line
        return out

    def fail_setting(self, section: Section, path: tuple, message: str):
        """Fail at the first setting under ``path`` (at the section when there is none)."""
        for setting in section.settings if path else ():
            if setting.path[:len(path)] == path:
                self.fail(Pos.of(setting.key), message)
        self.fail(section.pos, message)

    def check_config(self, section: Section, config: dict) -> None:
        S.check_config(config, lambda path, message: self.fail_setting(section, path, message))

    def check_table_budget(self, records: list, vocab: int) -> None:
        """Tables are vocab_size float32 values each, even written `{}`: their total is limited before any
        is allocated."""
        tables = [r.table for r in records if isinstance(r, Embed)]
        for block in (r for r in records if isinstance(r, Block)):
            for statement in block.statements:
                if isinstance(statement, NormStmt):
                    tables += [t.table for t in statement.tables]
                elif isinstance(statement, BigramStmt):
                    tables.append(statement.table)
        if len(tables) * vocab > S.MAX_TABLE_VALUES:
            table = tables[S.MAX_TABLE_VALUES // vocab]
            self.fail(table.pos, f"{len(tables)} tables of {vocab} values (vocab_size) hold "
                                 f"{len(tables) * vocab:,} values together; circuitir's limit is "
                                 f"{S.MAX_TABLE_VALUES:,}")

    def candidates(self, record: Candidates, config: dict) -> list[int]:
        self.candidates_pos = record.pos
        self.anchor(record.pos.line, record.pos.line, ("candidates",))
        vocab = config["vocab_size"]
        if not record.tokens:
            self.fail(record.pos, "no candidates: the circuit computes the logits of at least one token")
        for token in record.tokens:
            if int(token) >= vocab:
                self.fail(Pos.of(token), f"candidate token {int(token)} does not fit: vocab_size is {vocab}")
        return [int(t) for t in record.tokens]

    def embed(self, record: Embed, circuit: Circuit) -> None:
        channel = int(record.channel)
        self.anchor(record.pos.line, record.table.end_line, ("embed", channel))
        d_model = circuit.config["d_model"]
        if channel >= d_model:
            self.fail(Pos.of(record.channel), f"embed {channel} does not fit: the residual stream has {d_model} "
                                              f"channels (d_model)")
        if channel in circuit.embed:
            self.fail(Pos.of(record.channel), f"duplicate embedding column {channel} (first at line "
                                              f"{self.embed_pos[channel].line})")
        self.embed_pos[channel] = record.pos
        circuit.embed[channel] = self.table(record.table, circuit.config["vocab_size"])

    def table(self, table: Table, length: int) -> torch.Tensor:
        if table.block is not None:
            try:
                values = V.decode_f32_block(table.block)
            except V.ValueSpellingError as exc:
                self.fail(table.pos, str(exc))
            if len(values) != length:
                self.fail(table.pos, f"the table has {len(values)} values, expected {length} (vocab_size)")
        else:
            values = np.zeros(length, dtype=np.float32)
            seen = set()
            for index_token, value_token in table.entries:
                index = int(index_token)
                if index >= length:
                    self.fail(Pos.of(index_token), f"table index {index} does not fit: the table has {length} "
                                                   f"entries (vocab_size)")
                if index in seen:
                    self.fail(Pos.of(index_token), f"duplicate table index {index}")
                seen.add(index)
                values[index] = self.f32(value_token)
        return torch.from_numpy(np.array(values, dtype=np.float32))

    # -- blocks
    def block_header(self, block: Block, circuit: Circuit) -> None:
        self.anchor(block.pos.line, block.pos.line, ("block", block.point))
        if block.layer is not None and int(block.layer) >= circuit.config["n_layer"]:
            self.fail(Pos.of(block.layer), f"layer {int(block.layer)} does not exist: the model has "
                                           f"{circuit.config['n_layer']} layer(s) (n_layer)")

    def block(self, block: Block, circuit: Circuit, declared_heads: set) -> None:
        head = None  # the head whose line the q/k/v nodes that follow stand under
        for statement in block.statements:
            if isinstance(statement, NormStmt):
                self.norm(statement, block, circuit)
            elif isinstance(statement, HeadStmt):
                head = self.head(statement, block, circuit)
            elif isinstance(statement, NodeStmt):
                self.node(statement, block, circuit, head, declared_heads)
            else:
                self.bigram(statement, block, circuit)

    def attrs(self, attrs: list[Attr], allowed: tuple[str, ...], what: str) -> dict[str, Token]:
        out = {}
        for attr in attrs:
            if attr.name not in allowed:
                self.fail(Pos.of(attr.token), f"unknown attribute {attr.name!r} for {what} "
                                              f"(known: {', '.join(allowed)})")
            if attr.name in out:
                self.fail(Pos.of(attr.token), f"duplicate attribute {attr.name!r}")
            out[attr.name] = attr.number
        return out

    def norm(self, statement: NormStmt, block: Block, circuit: Circuit) -> None:
        name = str(statement.name)
        self.anchor(statement.pos.line, statement.pos.line, ("norm", name))
        if name != block.point:
            self.fail(Pos.of(statement.name), f"norm {name} stands in block `{block.title}`, whose norm is "
                                              f"{block.point}")
        if name in circuit.norms:
            self.fail(Pos.of(statement.name), f"duplicate norm {name} (first at line {self.norm_pos[name].line})")
        self.norm_pos[name] = statement.pos
        attrs = self.attrs(statement.attrs, ("eps", "width", "frozen"), "a norm")
        for needed in ("eps", "width"):
            if needed not in attrs:
                self.fail(statement.pos, f"norm {name} needs {needed}=")
        if not V.INT_RE.match(attrs["width"]) or int(attrs["width"]) < 1:
            self.fail(Pos.of(attrs["width"]), f"width must be a positive whole number, got {attrs['width']}")
        if int(attrs["width"]) > S.MAX_NORM_WIDTH:
            self.fail(Pos.of(attrs["width"]), f"width {attrs['width']} is beyond circuitir's limit of "
                                              f"{S.MAX_NORM_WIDTH} (2^40)")
        self.norm_width_pos[name] = Pos.of(attrs["width"])
        norm = NormData(rms=statement.kind == "rms", eps=self.f32(attrs["eps"]), width=int(attrs["width"]),
                        frozen_scale=self.f32(attrs["frozen"]) if "frozen" in attrs else None)
        for table in statement.tables:
            table_name = str(table.name)
            self.anchor(table.name.line, table.table.end_line, ("norm_table", name, table_name))
            if getattr(norm, table_name) is not None:
                self.fail(Pos.of(table.name), f"duplicate table {table_name} for norm {name}")
            setattr(norm, table_name, self.table(table.table, circuit.config["vocab_size"]))
        circuit.norms[name] = norm

    def head(self, statement: HeadStmt, block: Block, circuit: Circuit) -> int:
        index = int(statement.index)
        if block.sublayer != "attn":
            self.fail(statement.pos, f"a head stands in an attention block (`layer L attn:`), not in "
                                     f"`{block.title}`")
        layer = int(block.layer)
        self.anchor(statement.pos.line, statement.pos.line, ("head", layer, index))
        n_head = circuit.config["n_head"]
        if index >= n_head:
            self.fail(Pos.of(statement.index), f"head {index} does not fit: the model has {n_head} heads (n_head)")
        if (layer, index) in circuit.heads:
            self.fail(statement.pos, f"duplicate head {index} (first at line {self.head_pos[layer, index].line})")
        self.head_pos[layer, index] = statement.pos
        attrs = self.attrs(statement.attrs, ("sink",), "a head")
        circuit.heads[layer, index] = self.f32(attrs["sink"]) if "sink" in attrs else None
        return index

    def site_node(self, text: str, line: int, column: int) -> Node:
        """The node ``text`` (at line, column) names, checked against the model's sites and widths (a name
        checked once is remembered: a large file names the same few nodes many times)."""
        node = self.checked_nodes.get(text)
        if node is not None:
            return node
        node = parse_node(text)
        spec = self.specs.get(node.site)
        if spec is None:
            self.fail(Pos(line, column), f"unknown site {node.site} (the sites are L.attn.act_in, L.attn.q, "
                                     f"L.attn.k, L.attn.v, L.attn.resid_delta, L.mlp.act_in, L.mlp.post_act, "
                                     f"L.mlp.resid_delta for L < n_layer, final_resid and logits)")
        if node.index >= spec.width:
            self.fail(Pos(line, column + len(node.site) + 1),
                      f"node {node} does not fit: {node.site} has {spec.width} channels "
                      f"(indices 0 to {spec.width - 1})")
        self.checked_nodes[text] = node
        return node

    def node(self, statement: NodeStmt, block: Block, circuit: Circuit, head, declared_heads) -> None:
        token = statement.node
        node = self.site_node(str(token), token.line, token.column)
        self.anchor(token.line, token.line, ("node", node))
        spec = self.specs[node.site]
        place = "final" if spec.sublayer == "final" else f"layer {spec.layer} {spec.sublayer}"
        if place != block.title:
            self.fail(Pos.of(token), f"node {node} stands in block `{block.title}`; it belongs in `{place}`")
        if node in circuit.nodes:
            self.fail(Pos.of(token), f"duplicate node {node} (first at line {self.node_pos[node].line})")
        self.node_pos[node] = Pos.of(token)
        if spec.kind in ("q", "k", "v"):
            owner = node.index // circuit.config["d_head"]
            declared = (spec.layer, owner) in declared_heads
            if head is not None and owner != head:
                where = (f"write it under `head {owner}`" if declared else
                         f"declare `head {owner}`, or move it above the first head line")
                self.fail(Pos.of(token), f"node {node} belongs to head {owner}, but stands under `head {head}`: "
                                         f"{where}")
            if head is None and declared:
                self.fail(Pos.of(token), f"node {node} belongs to head {owner}: write it under `head {owner}`")
        if statement.const_value is not None:
            if node.site == "logits":
                self.fail(Pos.of(token), f"{node} is an output; it cannot be const")
            attrs = self.attrs(statement.attrs, CONST_ATTRS, "a const node")
            fields = {name: self.f32(attrs[name]) for name in attrs}
            fields["value"] = self.f32(statement.const_value)
            kind = "const"
        else:
            attrs = self.attrs(statement.attrs, NODE_ATTRS, "a node")
            fields = {name: self.f32(attrs[name]) for name in attrs}
            kind = "output" if node.site == "logits" else "kept"
        circuit.nodes[node] = NodeData(kind, **{**NODE_DEFAULTS, **fields})
        if statement.label is not None:
            self.anchor(statement.label.pos.line, statement.label.pos.line, ("label", node))
            circuit.labels[node] = Label(statement.label.text, statement.label.source)
        for edge in statement.edges:
            source = self.site_node(edge.source, edge.line, edge.column)
            self.anchor(edge.line, edge.line, ("edge", source, node))
            pos = Pos(edge.line, edge.column)
            if (source, node) in circuit.edges:
                self.fail(pos, f"duplicate edge {source} -> {node} (first at line "
                               f"{self.edge_pos[source, node].line})")
            self.edge_pos[source, node] = pos
            try:
                circuit.edges[source, node] = V.parse_f32(edge.weight)
            except V.ValueSpellingError as exc:
                self.fail(Pos(edge.line, edge.weight_column), str(exc))

    def bigram(self, statement: BigramStmt, block: Block, circuit: Circuit) -> None:
        if block.layer is not None:
            self.fail(statement.pos, f"the bigram table stands in the `final` block, not in `{block.title}`")
        node = self.site_node(str(statement.node), statement.node.line, statement.node.column)
        if node.site != "logits":
            self.fail(Pos.of(statement.node), f"a bigram column feeds an output logits[k], not {node}")
        self.anchor(statement.pos.line, statement.table.end_line, ("bigram", node.index))
        if node.index in self.bigram_pos:
            self.fail(statement.pos, f"duplicate bigram column {node} (first at line "
                                     f"{self.bigram_pos[node.index].line})")
        self.bigram_pos[node.index] = statement.pos
        self.bigram_columns[node.index] = self.table(statement.table, circuit.config["vocab_size"])

    # -- whole-circuit checks
    def check_edges(self, circuit: Circuit) -> None:
        for (source, target), pos in self.edge_pos.items():
            if source not in circuit.nodes:
                self.fail(pos, f"edge {source} -> {target}: {source} is not declared (declare it, or drop the "
                               f"edge)")

    def check_bigram(self, circuit: Circuit) -> None:
        columns = self.bigram_columns
        if not columns:
            return
        for k in range(len(circuit.candidates)):
            if k not in columns:
                self.fail(min(self.bigram_pos.values(), key=lambda p: p.line),
                          f"bigram column logits[{k}] is missing (a bigram table has one column per candidate)")
        circuit.bigram = torch.stack([columns[k] for k in range(len(circuit.candidates))], dim=1)

    def check_runnable(self, circuit: Circuit, config_section: Section, blocks: list[Block]) -> None:
        """What compile and run need beyond a well-formed circuit (``format_text`` does not ask for it)."""
        config = circuit.config
        for name in S.RUN_CONFIG:
            if name not in config:
                self.fail(config_section.pos, f"config: {name} is missing (compile and run need it)")
        block_pos = {b.point: b.pos for b in blocks}
        for name, norm in circuit.norms.items():
            if norm.width != config["d_model"]:
                self.fail(self.norm_width_pos[name], f"norm {name}: width={norm.width}, but a norm normalises the "
                                                     f"{config['d_model']} channels of the residual stream (d_model)")
        if "final" not in circuit.norms:
            self.fail(block_pos.get("final", self.candidates_pos),
                      "the final norm is missing (`norm final rms eps=... width=...` in the `final:` block): "
                      "the logits read final_resid through it")
        for node, pos in self.node_pos.items():
            spec = self.specs[node.site]
            if spec.kind == "act_in" and circuit.nodes[node].kind == "kept" and read_point(node.site) not in \
                    circuit.norms:
                self.fail(pos, f"{node} reads the residual stream through norm {read_point(node.site)}, "
                               f"which the circuit does not declare (`norm {read_point(node.site)} ...`)")
        for (source, target), pos in self.edge_pos.items():
            src, dst = self.specs[source.site], self.specs[target.site]
            if (src.kind, dst.kind) not in MODEL_WEIGHTS or (src.layer, src.sublayer) != (dst.layer, dst.sublayer):
                self.fail(pos, f"edge {source} -> {target}: the model has no weight from {source.site} to "
                               f"{target.site} (weights: act_in -> q/k/v and v -> resid_delta in attention, "
                               f"act_in -> post_act -> resid_delta in the MLP, final_resid -> logits)")
        live: dict[str, list[Node]] = {}
        for node in circuit.nodes:
            live.setdefault(node.site, []).append(node)
        compiled = config["vocab_size"] * (len(circuit.embed) + 2 * len(circuit.norms) + len(circuit.candidates))
        for (src, dst) in _weight_pairs(self.specs):
            kept = sum(1 for n in live.get(dst, ()) if circuit.nodes[n].kind == "kept")
            compiled += kept * len(live.get(src, ()))
        if compiled > S.MAX_COMPILED_VALUES:
            self.fail(self.candidates_pos, f"the compiled circuit would hold {compiled:,} float32 values "
                                           f"(tables and weight matrices); circuitir's limit is "
                                           f"{S.MAX_COMPILED_VALUES:,}")
        for name, nodes in live.items():
            spec = self.specs[name]
            if spec.topk is None:
                continue
            k = topk_k(config["afrac"], spec.width)
            if len(nodes) < k:
                first = min(nodes, key=lambda n: (self.node_pos[n].line, self.node_pos[n].column))
                self.fail(self.node_pos[first], f"{name} keeps its {k} largest channels (afrac {config['afrac']}, "
                                                f"location {spec.topk}), but the circuit has only {len(nodes)} "
                                                f"of them (kept or const): a top-k site needs none or at "
                                                f"least {k}")

    def check_graph_size(self, circuit: Circuit) -> None:
        """The invariants are checked on the circuit's graph, which links every residual write to every later
        read, and searches it once per output: its size is bounded before it is built."""
        kinds = [self.specs[n.site].kind for n in circuit.nodes]
        writes = sum(1 for k in kinds if k == "resid_delta")
        reads = sum(1 for k in kinds if k in ("act_in", "final_resid"))
        work = writes * reads + len(circuit.candidates) * (len(circuit.nodes) + len(circuit.edges))
        if work > S.MAX_GRAPH_WORK:
            self.fail(self.candidates_pos, f"the circuit is too large to check: {writes} residual writes x {reads} "
                                           f"reads + {len(circuit.candidates)} outputs x {len(circuit.nodes)} nodes "
                                           f"and {len(circuit.edges)} edges = {work:,}; circuitir's limit is "
                                           f"{S.MAX_GRAPH_WORK:,}")

    def check(self, circuit: Circuit) -> None:
        self.check_graph_size(circuit)
        try:
            check_circuit(circuit)
            return
        except CircuitError as exc:
            message = str(exc)
        self.fail(self.locate(message) or self.version_pos, message)

    def locate(self, message: str) -> Pos | None:
        """The statement a :func:`check_circuit` message names."""
        def node(text):
            try:
                return parse_node(text)
            except ValueError:
                return None

        if m := re.match(r"edge (\S+) -> (\S+):", message):
            return self.edge_pos.get((node(m[1]), node(m[2])))
        if m := re.match(r"node (\S+?)(:| )", message):
            return self.node_pos.get(node(m[1]))
        if m := re.match(r"head (\d+)\.attn\.head\[(\d+)\]", message):
            return self.head_pos.get((int(m[1]), int(m[2])))
        if m := re.match(r"embedding column (\d+)", message):
            return self.embed_pos.get(int(m[1]))
        if m := re.match(r"norm (\S+):", message):
            return self.norm_pos.get(m[1])
        if message.startswith("bigram"):
            return min(self.bigram_pos.values(), key=lambda p: p.line, default=None)
        if message.startswith("output"):
            return self.candidates_pos
        return None


# (source kind, target kind) of the model's weights, within one sublayer.
MODEL_WEIGHTS = {("act_in", "q"), ("act_in", "k"), ("act_in", "v"), ("v", "resid_delta"),
                 ("act_in", "post_act"), ("post_act", "resid_delta"), ("final_resid", "logits")}


def _weight_pairs(specs: dict):
    """(source site, target site) of every weight matrix the compiled circuit holds."""
    by_place: dict = {}
    for spec in specs.values():
        by_place.setdefault((spec.layer, spec.sublayer), {})[spec.kind] = spec.name
    for sites in by_place.values():
        for src, dst in MODEL_WEIGHTS:
            if src in sites and dst in sites:
                yield sites[src], sites[dst]


# ---------------------------------------------------------------- entry points

VERSION_RE = re.compile(r"[ \t]*circuitir[ \t]+([^\s#]+)")


def _check_version(text: str, filename: str, lines: list[str]) -> None:
    """A file in another language version gets a version error, not a syntax error from this grammar."""
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = VERSION_RE.match(line)
        if match and match[1] != str(LANGUAGE_VERSION):
            raise CirSyntaxError(f"unknown .cir language version {match[1]} (this circuitir reads version "
                                 f"{LANGUAGE_VERSION}: the first line is `circuitir {LANGUAGE_VERSION}`)",
                                 filename, number, match.start(1) + 1, line)
        return


def _syntax_error(exc: UnexpectedInput, text: str, filename: str, lines: list[str]) -> CirSyntaxError:
    line = getattr(exc, "line", -1)
    column = getattr(exc, "column", -1)
    if isinstance(exc, UnexpectedCharacters):
        word = re.match(r"[^\s]{1,30}", text[exc.pos_in_stream:])
        what = f"unexpected `{word[0] if word else text[exc.pos_in_stream]}`"
        expected = _describe_expected(exc.allowed or ())
    else:
        token = exc.token
        expected = _describe_expected(exc.expected)
        if token.type == "$END":
            what = "unexpected end of file"
            line, column = len(lines), len(lines[-1]) + 1
        elif token.type == "_NL":
            what = "unexpected end of line"
        else:
            shown = str(token).split("\n")[0]
            word = re.match(r"[^\s]{1,30}", text[token.start_pos:]) if token.start_pos is not None else None
            if word and word[0].startswith(shown):
                shown = word[0]  # the whole word, not the prefix the lexer made a token of
            what = f"unexpected `{shown}`"
    if line is None or line < 1:
        line, column = len(lines), len(lines[-1]) + 1
    line = min(line, len(lines))
    return CirSyntaxError(what, filename, line, max(column, 1), lines[line - 1], expected)


def parse_with_comments(text: str, filename: str = "<string>", runnable: bool = True) -> tuple[Circuit, dict]:
    """Parse .cir text into a checked Circuit, and the comments by the statement they belong to (see
    ``_parse_with_comments``), with the cyclic garbage collector paused (``values.gc_paused``)."""
    with V.gc_paused():
        return _parse_with_comments(text, filename, runnable)


def _parse_with_comments(text: str, filename: str = "<string>", runnable: bool = True) -> tuple[Circuit, dict]:
    """Parse .cir text into a checked Circuit, and the comments by the statement they belong to.

    With ``runnable`` (the default) the circuit is also checked for everything compile and run need
    (the final norm, the norms of kept reads, model weights only, top-k sites, run's config fields,
    the size of the compiled circuit); ``format_text`` leaves that out, to format incomplete circuits."""
    lines = text.split("\n")
    if len(lines) > S.MAX_LINES:
        raise CirSyntaxError(f"{len(lines):,} lines; circuitir's limit is {S.MAX_LINES:,}", filename,
                             S.MAX_LINES + 1, 1, lines[S.MAX_LINES])
    _check_version(text, filename, lines)
    source = text if text.endswith("\n") else text + "\n"
    builder = Builder(text, filename, runnable)
    _local.comments = tokens = []
    _local.builder, _local.depth = builder, 0
    try:
        tree = _lark().parse(source)
        records = ToStatements(builder.fail).transform(tree)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, filename, lines) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, CirSyntaxError):
            raise exc.orig_exc from None
        # Not expected (every rule's own errors are CirSyntaxErrors); still the text's fault, not a crash.
        meta = getattr(exc.obj, "meta", None)
        line, column = getattr(meta, "line", 1), getattr(meta, "column", 1)
        raise CirSyntaxError(f"cannot read this statement: {exc.orig_exc}", filename, line, column,
                             lines[min(line, len(lines)) - 1]) from None
    except LarkError as exc:  # not expected from a built grammar; still a syntax problem, not a crash
        raise CirSyntaxError(f"cannot parse: {exc}", filename, 1, 1, lines[0]) from None
    finally:
        _local.comments = _local.builder = None
    circuit = builder.build(records)
    return circuit, _attach_comments(tokens, builder.anchors, lines)


def parse(text: str, filename: str = "<string>") -> Circuit:
    """.cir text -> a checked :class:`Circuit` that compiles and runs; bad text raises :class:`CirSyntaxError`."""
    return parse_with_comments(text, filename)[0]
