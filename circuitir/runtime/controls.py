"""Controls that answer the critics of circuit faithfulness (DESIGN §5).

Beside ``check``'s four claims, what Miller et al. (2024, "Transformer circuit
faithfulness metrics are not robust"), the replication of the weight-sparse
paper and MIB's circuit track ask of a circuit:

* ``faithfulness_curve``: the normalised faithfulness
  f = (L(∅) − L(C)) / (L(∅) − L(M)) of the circuit's nodes added most
  important first (importance: the held-out loss without the node, from the
  minimality figures), with MIB's areas: CPR, the area under f over the
  fraction of the circuit kept, and CMD, the area under |1 − f|;
* ``random_circuits``: the loss of random node sets of the circuit's size
  (how special the circuit's nodes are);
* ``partial_ablation``: the circuit's loss when only a random half of the
  nodes outside it are ablated (a circuit that works only under one exact
  ablation pattern shows up as a spread here);
* ``nonsense_task``: the task with its labels shuffled, for the same
  extraction to fail on (mask search can "succeed" on nonsense).

Every figure is measured through the masked graph (``ir/masked.py``), several
masks per forward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from circuitir.tasks import Example


def _losses(evaluator, masks: list[dict], scale: float, width: int = 8) -> list[float]:
    from circuitir.tasks.evaluate import binary_loss
    out = []
    for start in range(0, len(masks), width):
        for pairs in evaluator.pair_logits_many(masks[start:start + width]):
            out.append(float(binary_loss(pairs * scale)))
    return out


def _mask(widths: dict, nodes) -> dict:
    mask = {name: torch.zeros(width, dtype=torch.bool) for name, width in widths.items()}
    for site, index in nodes:
        mask[site][index] = True
    return mask


def _trapezoid(ys: list[float]) -> float:
    """Area under ys over [0, 1], the points evenly spaced."""
    if len(ys) < 2:
        return 0.0
    step = 1.0 / (len(ys) - 1)
    return sum((a + b) / 2 * step for a, b in zip(ys, ys[1:]))


def faithfulness_curve(evaluator, widths: dict, ordered_nodes: list, full_loss: float, scale: float = 1.0) -> dict:
    """f(k) for the k most important nodes, k = 0..n, and MIB's CPR and CMD areas."""
    masks = [_mask(widths, ordered_nodes[:k]) for k in range(len(ordered_nodes) + 1)]
    losses = _losses(evaluator, masks, scale)
    empty = losses[0]
    span = empty - full_loss
    faithfulness = [(empty - loss) / span if span != 0 else float("nan") for loss in losses]
    return {"sizes": list(range(len(losses))), "loss": losses, "faithfulness": faithfulness,
            "empty_loss": empty, "full_model_loss": full_loss,
            "cpr": _trapezoid(faithfulness), "cmd": _trapezoid([abs(1 - f) for f in faithfulness]),
            "order": "most important first (held-out loss without the node)"}


def random_circuits(evaluator, widths: dict, size: int, target: float, draws: int = 20, seed: int = 0,
                    scale: float = 1.0) -> dict:
    """Losses of ``draws`` uniformly random node sets of ``size`` nodes."""
    everything = [(name, i) for name, width in widths.items() for i in range(width)]
    rng = random.Random(f"random-circuits:{seed}")
    losses = _losses(evaluator, [_mask(widths, rng.sample(everything, size)) for _ in range(draws)], scale)
    return {"size": size, "draws": draws, "losses": losses, "min_loss": min(losses),
            "mean_loss": sum(losses) / len(losses), "reach_target": sum(loss <= target for loss in losses)}


def partial_ablation(evaluator, circuit_mask: dict, target: float, draws: int = 10, seed: int = 0,
                     scale: float = 1.0) -> dict:
    """The circuit's loss with only a random half of the outside nodes ablated (the rest left live)."""
    generator = torch.Generator().manual_seed(seed)
    masks = [{name: keep | (torch.rand(keep.shape, generator=generator) < 0.5) for name, keep in circuit_mask.items()}
             for _ in range(draws)]
    losses = _losses(evaluator, masks, scale)
    return {"draws": draws, "losses": losses, "max_loss": max(losses), "mean_loss": sum(losses) / len(losses),
            "within_target": sum(loss <= target for loss in losses)}


@dataclass(frozen=True)
class NonsenseTask:
    """A task with its labels shuffled: each example's correct and alternative answers swapped by a
    seeded coin, so no mechanism of the model can do it."""
    task: object
    seed: int = 0

    @property
    def name(self) -> str:
        return self.task.name

    def examples(self, split: str = "heldout", n: int = 256, seed: int = 0) -> list[Example]:
        out = []
        for example in self.task.examples(split, n, seed):
            coin = random.Random(f"nonsense:{self.seed}:{example.prompt}").random() < 0.5
            out.append(Example(example.prompt, example.alternative, example.correct, example.completion)
                       if coin else example)
        return out


def nonsense_task(loaded, circuit, pipeline: str | None, seed: int, progress: bool) -> dict:
    """The same extraction on the task with shuffled labels: it must not reach the target with a circuit
    as small as the real one."""
    from circuitir.errors import UserError
    from circuitir.runtime.extract import extract
    from circuitir.tasks import get_task

    task = NonsenseTask(get_task(circuit.provenance.task), seed)
    try:
        found, _ = extract(loaded, task, pipeline=pipeline, seed=seed, progress=progress)
    except UserError as exc:  # the full model cannot do nonsense, so no circuit of it can
        return {"reached_target": False, "reason": str(exc), "passed": True}
    return {"reached_target": True, "nodes": found.n_nodes, "circuit_nodes": circuit.n_nodes,
            "passed": found.n_nodes > circuit.n_nodes}
