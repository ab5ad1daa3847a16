"""Typed views of a circuit's header: where it came from, how it was made, how its logits are calibrated.

The header is the circuit's free-form record (``header:`` in a .cir file): it keeps every setting a file
gives, including ones this version does not know, so that ``fmt`` and ``diff`` round-trip it. Code does
not read it by key. It reads these typed records instead, built from the header in one place
(:meth:`Circuit.provenance`, :meth:`Circuit.calibration`, :meth:`Circuit.norm_mode`); the parser has
already checked every field they read (``grammar/schema.check_header``), so building them cannot fail
on a parsed file.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Calibration:
    """``logits = scale * logits + shift``, fitted by ``prune{calibrate=true}`` (identity otherwise)."""
    scale: float = 1.0
    shift: float = 0.0

    @classmethod
    def of(cls, header: dict) -> "Calibration":
        table = header.get("calibration")
        table = table if isinstance(table, dict) else {}
        return cls(float(table.get("scale", 1.0)), float(table.get("shift", 0.0)))

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.shift == 0.0


@dataclass(frozen=True)
class Ablation:
    """How channels outside the circuit were replaced when it was extracted."""
    kind: str = "mean"          # mean, zero or resample
    over: str | None = None     # mean: "pretrain" (corpus tokens) or "task" (task prompts)
    tokens: int | None = None   # mean: how many tokens the means were taken over
    corpus_sha256: str | None = None


@dataclass(frozen=True)
class Claims:
    """What extraction measured and ``check`` re-measures (the header's ``metrics`` group)."""
    target_loss: float | None = None     # the task loss the circuit was extracted to meet
    selection_goal: float | None = None  # what the search aimed at on its selection prompts (target - margin)
    loss: float | None = None            # the circuit's held-out task loss when it was written

    @classmethod
    def of(cls, header: dict) -> "Claims":
        metrics = header.get("metrics")
        metrics = metrics if isinstance(metrics, dict) else {}
        target = metrics.get("target_loss")
        goal = metrics.get("selection_goal", target)
        loss = metrics.get("loss")
        return cls(*(None if v is None else float(v) for v in (target, goal, loss)))


@dataclass(frozen=True)
class Provenance:
    """The model, task, ablation and pipeline a circuit was extracted with (all None for a hand-written
    circuit that names none)."""
    model_sha256: str | None = None
    model_file: str | None = None
    tokenizer: dict | str | None = None     # source.tokenizer: a spec table, or words describing the vocabulary
    task: str | None = None                 # the task's name (a built-in task, or a task file's name)
    task_spec: dict = field(default_factory=dict)  # the rest of the header's task group (file, sha256, ...)
    ablation: Ablation = field(default_factory=Ablation)
    pipeline: str | None = None
    seed: int = 0

    @classmethod
    def of(cls, header: dict) -> "Provenance":
        source = header.get("source")
        source = source if isinstance(source, dict) else {}
        task = header.get("task")
        if isinstance(task, dict):
            task_name, task_spec = task.get("name"), {k: v for k, v in task.items() if k != "name"}
        else:
            task_name, task_spec = task, {}
        ablation = header.get("ablation")
        if isinstance(ablation, dict):
            ablation = Ablation(ablation.get("kind", "mean"), ablation.get("over"), ablation.get("tokens"),
                                ablation.get("corpus_sha256"))
        else:
            # A hand-written circuit may say it in a word; one that names its model has a group (schema).
            ablation = Ablation(ablation) if ablation in ("mean", "zero", "resample") else Ablation()
        pipeline = header.get("pipeline")
        if isinstance(pipeline, list):
            pipeline = ", ".join(pipeline)
        return cls(model_sha256=source.get("sha256"), model_file=source.get("file"),
                   tokenizer=source.get("tokenizer"), task=task_name, task_spec=task_spec, ablation=ablation,
                   pipeline=pipeline, seed=int(header.get("seed", 0)))
