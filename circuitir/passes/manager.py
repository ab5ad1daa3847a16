"""The pass manager: passes with names and typed options, pipelines written as text.

A pipeline is text, MLIR/xDSL style::

    trace, mean-ablate{over=pretrain,tokens=65536}, prune{target=0.15}, lower, fold-constants, dce

It is parsed and validated (pass names, option names and types, order) before
anything runs, and the canonical form of the pipeline that ran is written
into the circuit's header so ``circuitir extract --pipeline`` can re-run it.

Each pass declares what it needs in the :class:`PipelineState` and what it
provides; a pipeline whose passes are out of order is refused up front.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Callable

from circuitir.errors import UserError


@dataclass
class PipelineState:
    """What passes read and write. ``model`` is a LoadedModel; the rest is filled in by passes."""
    loaded: object
    task: object
    seed: int = 0
    progress: bool = True
    candidates: list = field(default_factory=list)  # the task's answer tokens: the circuit's outputs
    graph: object = None        # GraphIR (trace)
    ablation: dict | None = None  # {"kind", "fills", "over", "tokens", "means"} (ablate passes)
    mask: dict | None = None    # {site: bool tensor} (prune)
    circuit: object = None      # Circuit (lower, fold-constants, dce)
    metrics: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=lambda: {"scale": 1.0, "shift": 0.0})
    # Results a pass may reuse across runs of one pipeline that differ only in options that come later
    # (the learned mask across prune targets: ``extract_frontier``); keyed by what they depend on.
    memo: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable                 # (state, options) -> None, updates state
    options: type                 # a dataclass of typed options with defaults
    needs: tuple[str, ...] = ()   # state fields that must be set before
    provides: tuple[str, ...] = ()
    summary: str = ""


REGISTRY: dict[str, Pass] = {}


def register(name: str, options: type, needs=(), provides=(), summary: str = ""):
    def decorate(run):
        REGISTRY[name] = Pass(name, run, options, tuple(needs), tuple(provides), summary)
        return run
    return decorate


@dataclass
class PassCall:
    name: str
    options: object

    def text(self, explicit: bool = False) -> str:
        """Canonical text: options in declaration order; only those that differ from their defaults,
        or every one with ``explicit`` (what a circuit's header records, so that changing a default
        later cannot change what re-running its pipeline does)."""
        defaults = REGISTRY[self.name].options()
        parts = [f"{f.name.replace('_', '-')}={_format(getattr(self.options, f.name))}"
                 for f in dataclasses.fields(self.options)
                 if explicit or getattr(self.options, f.name) != getattr(defaults, f.name)]
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


CALL_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*(\{([^{}]*)\})?\s*(,|$)")


def _convert(pass_name: str, option: dataclasses.Field, raw: str):
    kind = option.type if isinstance(option.type, type) else eval(option.type, {})  # annotations are strings
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if kind is int and len(raw.strip().lstrip("+-")) > 9:  # int() of a 5,000-digit number is slow
            raise UserError(f"pipeline: {pass_name}{{{option.name.replace('_', '-')}={raw[:20]}...}}: a whole "
                            "number of at most 9 digits")
        value = kind(raw)
        if kind is float and not math.isfinite(value):
            raise UserError(f"pipeline: {pass_name}{{{option.name.replace('_', '-')}={raw}}}: expected a finite "
                            "number")
        return value
    except ValueError:
        raise UserError(f"pipeline: {pass_name}{{{option.name.replace('_', '-')}={raw}}}: expected "
                        f"{kind.__name__}") from None


def parse_pipeline(text: str) -> list[PassCall]:
    """Parse and validate a pipeline; raises UserError naming the first problem."""
    calls, position = [], 0
    text = text.strip()
    if not text:
        raise UserError("pipeline: empty (e.g. 'trace, mean-ablate, prune{target=0.15}, lower, dce')")
    while position < len(text):
        match = CALL_RE.match(text, position)
        if not match:
            raise UserError(f"pipeline: cannot read {text[position:position + 30]!r} at column {position + 1} "
                            "(expected name or name{key=value,...}, separated by commas)")
        name, body = match.group(1), match.group(3)
        if name not in REGISTRY:
            raise UserError(f"pipeline: unknown pass {name!r} (known: {', '.join(REGISTRY)}; see `circuitir passes`)")
        spec = REGISTRY[name]
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(spec.options)}
        values = {}
        for item in filter(None, (s.strip() for s in (body or "").split(","))):
            if "=" not in item:
                raise UserError(f"pipeline: {name}{{{item}}}: options are key=value")
            key, raw = (s.strip() for s in item.split("=", 1))
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise UserError(f"pipeline: pass {name} has no option {key!r} (options: {known})")
            if fields[key].name in values:
                raise UserError(f"pipeline: {name}{{{key}}} is given twice")
            values[fields[key].name] = _convert(name, fields[key], raw)
        try:
            options = spec.options(**values)
        except (TypeError, ValueError) as exc:
            raise UserError(f"pipeline: {name}: {exc}") from None
        validate = getattr(options, "validate", None)
        if validate:
            validate()
        calls.append(PassCall(name, options))
        position = match.end()
    check_order(calls)
    return calls


def check_order(calls: list[PassCall]) -> None:
    available = {"loaded", "task"}
    for call in calls:
        spec = REGISTRY[call.name]
        missing = [need for need in spec.needs if need not in available]
        if missing:
            producers = [p.name for p in REGISTRY.values() if missing[0] in p.provides]
            raise UserError(f"pipeline: pass {call.name} needs {missing[0]}, which comes from "
                            f"{' or '.join(producers)}; put that pass before {call.name}")
        available |= set(spec.provides)
    if "circuit" not in available:
        raise UserError("pipeline: it never produces a circuit (end it with lower, fold-constants, dce)")


def pipeline_text(calls: list[PassCall], explicit: bool = False) -> str:
    return ", ".join(call.text(explicit) for call in calls)


def run_pipeline(calls: list[PassCall], state: PipelineState) -> PipelineState:
    """Run the passes in order, verifying the IR after each one (as xDSL does): a broken invariant is
    reported with the name of the pass that broke it."""
    for call in calls:
        REGISTRY[call.name].run(state, call.options)
        verify_state(state, call.name)
    return state


def verify_state(state: PipelineState, pass_name: str) -> None:
    """The Graph IR must lint (every node defined before use); a circuit must keep its invariants, and
    once dead code is eliminated every kept node must reach the output."""
    from circuitir.ir.circuit import CircuitError
    try:
        graph = getattr(state.graph, "graph_module", None)
        if graph is not None:
            graph.graph.lint()
        if state.circuit is not None:
            state.circuit.verify(reachable=pass_name == "dce")
    except (CircuitError, RuntimeError) as exc:
        raise UserError(f"pass {pass_name} left an invalid IR: {exc}") from None
