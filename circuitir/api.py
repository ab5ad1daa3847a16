"""The public API, re-exported by the package: ``import circuitir as cir``.

    model = cir.load_model("models/sparse.pt")          # also OpenAI's released checkpoints
    circuit = cir.extract(model, "brackets", target_loss=0.15)
    report = cir.check(circuit, model)                   # the four claims, each with "passed"
    circuit.save("brackets.cir"); same = cir.load("brackets.cir")
    circuit.run(["x = [[1, 2]"])                        # the circuit alone, no model
    cir.diff(circuit, same).equal
    cir.render(circuit, "brackets.svg")

Every function here is what a CLI command calls; the CLI only parses arguments.
A model argument is a :class:`~circuitir.models.checkpoint.LoadedModel` or a
path; a task argument is a :class:`~circuitir.tasks.Task` or a task name.
"""

from __future__ import annotations

from pathlib import Path

from circuitir.errors import UserError
from circuitir.ir.circuit import Circuit


def load_model(path, tokenizer=None, device=None):
    """A checkpoint (circuitir's, or OpenAI's directory / ``final_model.pt``), loaded without unpickling
    arbitrary objects. ``tokenizer``: the directory of the BPE files a release's config names (else
    $CIRCUITIR_TOKENIZER or the files beside it); ``device``: where the model runs (``auto``, ``cpu``,
    ``cuda``, ``mps``; every masked graph and recording follows it, circuits and their files stay on the
    CPU). Refuses a model circuitir cannot tokenize prompts for."""
    from circuitir.models.checkpoint import LoadedModel
    from circuitir.models.checkpoint import load_model as load_checkpoint
    from circuitir.models.tokenizer import TOKENIZER_ENV

    if isinstance(path, LoadedModel):
        return path
    loaded = load_checkpoint(path, tokenizer=tokenizer)
    if device is not None:
        from circuitir.models.device import resolve_device
        loaded.model.to(resolve_device(device))
    if loaded.tokenizer is None:
        name = loaded.config.extra.get("tokenizer_name", "tinypython_2k")
        raise UserError(f"{path} has a {loaded.config.vocab_size}-token vocabulary and no tokenizer: its config "
                        f"names {name}; give that tokenizer's files with --tokenizer DIR or ${TOKENIZER_ENV} "
                        "(a directory holding vocab.bpe and encoder.json)")
    return loaded


def tasks() -> dict:
    """Every registered task, by name (aliases included)."""
    from circuitir.tasks import TASKS
    return dict(TASKS)


def get_task(task):
    from circuitir.tasks import Task
    from circuitir.tasks import get_task as lookup
    return task if isinstance(task, Task) else lookup(task)


def extract(model, task, *, target_loss: float | None = None, pipeline: str | None = None,
            ablation: str | None = None, seed: int = 0, progress: bool = False) -> Circuit:
    """The smallest circuit of ``model`` meeting ``target_loss`` on ``task`` (default pipeline and target
    0.15 nats); its header records how it was made and what it reaches (``header["metrics"]``)."""
    from circuitir.runtime.extract import extract as run_extract
    circuit, _ = run_extract(load_model(model), get_task(task), pipeline=pipeline, target=target_loss,
                             ablation=ablation, seed=seed, progress=progress)
    return circuit


def frontier(model, task, targets, *, pipeline: str | None = None, ablation: str | None = None, seed: int = 0,
             progress: bool = False) -> dict[float, Circuit | None]:
    """One circuit per target loss, in one run (the learned mask and the means shared): ``{target: circuit}``,
    ``None`` where no circuit can meet the target. Each is the circuit ``extract(..., target_loss=t)`` gives."""
    from circuitir.runtime.extract import extract_frontier
    rows = extract_frontier(load_model(model), get_task(task), list(targets), pipeline=pipeline, ablation=ablation,
                            seed=seed, progress=progress)
    return {row["target"]: row.get("circuit") for row in rows}


def check(circuit: Circuit, model, *, n: int = 256, seed: int = 0, necessity_loss: float | None = None,
          control: bool = True, nonsense: bool = False, progress: bool = False) -> dict:
    """Sufficiency, necessity, minimality and faithfulness of ``circuit`` against the model it came from,
    and the controls (faithfulness curve with CPR/CMD, random circuits, partial ablation; the shuffled-label
    task with ``nonsense``)."""
    from circuitir.runtime.check import CHANCE
    from circuitir.runtime.check import check as run_check
    return run_check(circuit, load_model(model), n=n, seed=seed, control=control, progress=progress, nonsense=nonsense,
                     necessity_loss=CHANCE / 2 if necessity_loss is None else necessity_loss)


def read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def load(path) -> Circuit:
    """A ``.cir`` file, parsed and verified; a syntax error reports file:line:col."""
    from circuitir.grammar import parse
    return parse(read_text(path), str(path))


def diff(a: Circuit, b: Circuit, *, tolerance: float = 1e-6, header: bool = True):
    """Structural differences (nodes, edges, weights beyond ``tolerance``, header); ``.equal``, ``.to_dict()``."""
    from circuitir.runtime.diff import structural_diff
    return structural_diff(a, b, tolerance=tolerance, header=header)


def site_means(model, tokens, batch_size: int = 64) -> dict:
    """Per-channel means of every site over ``tokens`` (N, T): mean ablation's stand-in values."""
    from circuitir.ir.ablation import site_means as measure
    return measure(getattr(model, "model", model), tokens, batch_size)


def render(circuit: Circuit, output, title: str | None = None) -> None:
    """Draw ``circuit`` to ``output`` (.dot source, or .pdf/.svg/.png through Graphviz)."""
    from circuitir.render.graphviz import render as draw
    draw(circuit, output, title)
