"""Task loss of a circuit run on its own (the compiled circuit, no model)."""

from __future__ import annotations

import torch

from circuitir.errors import UserError
from circuitir.runtime.compile import compile_circuit
from circuitir.tasks import Task
from circuitir.tasks.evaluate import TaskBatch, accuracy, binary_loss, encode_examples


def pair_logits_from_candidates(logits: torch.Tensor, batch: TaskBatch, candidates: list[int]) -> torch.Tensor:
    """(N, T, K) candidate logits -> (N, 2) [correct, alternative] at each prompt's last token."""
    position = {token: k for k, token in enumerate(candidates)}
    try:
        correct = torch.tensor([position[int(t)] for t in batch.correct])
        alternative = torch.tensor([position[int(t)] for t in batch.alternative])
    except KeyError as exc:
        raise UserError(f"the circuit has no output for token {exc.args[0]}, which this task needs; "
                        "was it extracted for another task?") from None
    at_last = logits[torch.arange(len(batch)), batch.last]
    return torch.stack([at_last.gather(-1, correct[:, None])[:, 0],
                        at_last.gather(-1, alternative[:, None])[:, 0]], dim=-1)


@torch.no_grad()
def circuit_pair_logits(circuit, task: Task, tokenizer, split: str = "heldout", n: int = 256, seed: int = 0,
                        module=None) -> tuple[torch.Tensor, TaskBatch]:
    batch = encode_examples(task, task.examples(split, n, seed), tokenizer, circuit.config["block_size"])
    module = module or compile_circuit(circuit)
    return pair_logits_from_candidates(module(batch.tokens), batch, circuit.candidates), batch


def circuit_task_metrics(circuit, task: Task, tokenizer, split: str = "heldout", n: int = 256, seed: int = 0,
                         module=None) -> dict:
    pair, _ = circuit_pair_logits(circuit, task, tokenizer, split, n, seed, module)
    return {"task": task.name, "loss": float(binary_loss(pair)), "accuracy": accuracy(pair), "n": len(pair)}
