"""extract: run a pass pipeline on a model for one task and return the circuit, with its header."""

from __future__ import annotations

import dataclasses
import time

import torch

from circuitir.errors import UserError
from circuitir.ir.circuit import CircuitError
from circuitir.passes import DEFAULT_PIPELINE, PipelineState, parse_pipeline, pipeline_text, run_pipeline
from circuitir.tasks import Task


def task_candidates(task: Task, tokenizer, n: int = 64) -> list[int]:
    """The distinct first tokens of the task's answers: the logits a circuit for it computes."""
    from circuitir.tasks import first_token
    tokens = set()
    for example in task.examples("train", n, seed=0):
        tokens.add(first_token(tokenizer, example.correct))
        tokens.add(first_token(tokenizer, example.alternative))
    return sorted(tokens)


def check_expressible(task: Task, loaded, n: int = 64) -> None:
    """Refuse a task whose prompts or answers use tokens outside the model's vocabulary."""
    vocab = loaded.config.vocab_size
    for example in task.examples("train", n, seed=0):
        for text in (example.prompt, example.correct, example.alternative):
            outside = [t for t in loaded.tokenizer.encode(text) if not 0 <= t < vocab]
            if outside:
                raise UserError(f"task {task.name} needs token {outside[0]} "
                                f"({loaded.tokenizer.token_str(outside[0])!r}), outside this model's vocabulary "
                                f"of {vocab} tokens; its tokenizer cannot express the task for this model")


def build_pipeline(pipeline: str | None, target: float | None, ablation: str | None) -> list:
    text = pipeline or DEFAULT_PIPELINE
    calls = parse_pipeline(text)
    if ablation is not None:
        if ablation == "resample":
            raise UserError("resample ablation replaces a channel by its value on another prompt, which is not a "
                            "constant a circuit file can state; extract with mean or zero and measure resample "
                            "with `circuitir check`")
        wanted = {"mean": "mean-ablate", "zero": "zero-ablate"}[ablation]
        for call in calls:
            if call.name.endswith("-ablate") and call.name != wanted:
                if pipeline is not None:
                    raise UserError(f"--ablation {ablation} contradicts the pipeline's {call.name}")
        if pipeline is None and wanted != "mean-ablate":
            calls = parse_pipeline(text.replace("mean-ablate{over=pretrain,tokens=65536}", wanted))
    if target is not None:
        for call in calls:
            if call.name == "prune":
                call.options.target = float(target)
                call.options.validate()
    return calls


def extract(loaded, task: Task, *, pipeline: str | None = None, target: float | None = None,
            ablation: str | None = None, seed: int = 0, progress: bool = True, heldout: int = 256) -> tuple:
    """Returns (circuit, summary dict). The circuit's header records how to reproduce it."""
    calls = build_pipeline(pipeline, target, ablation)
    state = _start(loaded, task, seed, progress)
    started = time.time()
    run_pipeline(calls, state)
    return _finish(state, calls, heldout, started)


def extract_frontier(loaded, task: Task, targets: list[float], *, pipeline: str | None = None,
                     ablation: str | None = None, seed: int = 0, progress: bool = True,
                     heldout: int = 256) -> list[dict]:
    """The loss-vs-size frontier: one circuit per target, in one run. The passes before ``prune`` (trace,
    ablation means) run once and prune's learned mask is learned once (``PipelineState.memo``); bisection,
    greedy minimisation and the passes after run per target. Each circuit is byte-identical to what
    ``extract(..., target=t)`` writes, so each checks like one.

    Returns, per target (ascending), ``{"target", "circuit", "summary"}``, or ``{"target", "error"}`` where
    no circuit can meet it (a target below the full model's loss)."""
    calls = build_pipeline(pipeline, None, ablation)
    at = next((i for i, call in enumerate(calls) if call.name == "prune"), None)
    if at is None:
        raise UserError("a frontier over targets needs a pipeline with a prune pass")
    state = _start(loaded, task, seed, progress)
    run_pipeline(calls[:at], state)
    rows = []
    for target in sorted(set(float(t) for t in targets)):
        target_calls = build_pipeline(pipeline, target, ablation)
        started = time.time()
        one = dataclasses.replace(state, mask=None, circuit=None, metrics=dict(state.metrics),
                                  calibration={"scale": 1.0, "shift": 0.0})  # the memo is shared
        try:
            run_pipeline(target_calls[at:], one)
        except UserError as exc:
            rows.append({"target": target, "error": str(exc)})
            continue
        circuit, summary = _finish(one, target_calls, heldout, started)
        rows.append({"target": target, "circuit": circuit, "summary": summary})
    return rows


def _start(loaded, task: Task, seed: int, progress: bool) -> PipelineState:
    if loaded.tokenizer is None:
        raise UserError("this model has no tokenizer circuitir can use (byte-level models only without one)")
    check_expressible(task, loaded)
    torch.manual_seed(seed)
    candidates = task_candidates(task, loaded.tokenizer)
    return PipelineState(loaded=loaded, task=task, seed=seed, progress=progress, candidates=candidates)


def _finish(state: PipelineState, calls: list, heldout: int, started: float) -> tuple:
    """The pipeline's circuit with its header (how to reproduce it) and held-out metrics."""
    from circuitir.runtime.evaluate import circuit_task_metrics

    loaded, task, candidates = state.loaded, state.task, state.candidates
    circuit = state.circuit
    prune_call = next((c for c in calls if c.name == "prune"), None)
    target_loss = prune_call.options.target if prune_call else None
    circuit.header = {
        "source": {"sha256": loaded.sha256, "file": str(loaded.path).rsplit("/", 1)[-1],
                   "tokenizer": loaded.tokenizer.spec},
        "task": {"name": task.name, "loss": "binary_ce_last_position",
                 **({k: v for k, v in task.spec().items() if k != "name"} if hasattr(task, "spec") else {}),
                 "candidates": " ".join(repr(loaded.tokenizer.token_str(t)) for t in candidates)},
        "ablation": {k: v for k, v in state.ablation.items() if k in ("kind", "over", "tokens", "corpus_sha256")},
        "norm": "live",
        "pipeline": pipeline_text(calls, explicit=True),
        "seed": state.seed,
        "calibration": dict(state.calibration),
    }
    try:
        circuit.verify()
    except CircuitError as exc:
        raise UserError(f"the pipeline {circuit.header['pipeline']!r} leaves an invalid circuit: {exc} "
                        "(end the pipeline with dce, which drops nodes with no path to the output)") from None
    metrics = circuit_task_metrics(circuit, task, loaded.tokenizer, n=heldout)
    circuit.header["metrics"] = {
        "target_loss": target_loss, "loss": metrics["loss"], "accuracy": metrics["accuracy"],
        "heldout_prompts": metrics["n"], "nodes": circuit.n_nodes, "edges": circuit.n_edges,
        **{k: v for k, v in state.metrics.get("prune", {}).items() if k not in ("evaluations", "forwards")},
    }
    summary = {"task": task.name, "nodes": circuit.n_nodes, "edges": circuit.n_edges, "loss": metrics["loss"],
               "target_loss": target_loss, "seconds": time.time() - started}
    return circuit, summary
