"""Task loss and accuracy: the paper's binary cross-entropy at the last position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from circuitir.errors import UserError
from circuitir.tasks import Example, Task, answer_tokens


@dataclass
class TaskBatch:
    """Prompts tokenized, right-padded, with the two candidate tokens of each."""
    tokens: torch.Tensor        # (N, T) long, right-padded with 0
    last: torch.Tensor          # (N,) index of each prompt's last token
    correct: torch.Tensor       # (N,) token id
    alternative: torch.Tensor   # (N,) token id
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def encode_examples(task: Task, examples: list[Example], tokenizer, block_size: int) -> TaskBatch:
    rows, last, correct, alternative = [], [], [], []
    for example in examples:
        tokens = tokenizer.encode(example.prompt)
        if len(tokens) > block_size:
            raise UserError(f"task {task.name}: a prompt is {len(tokens)} tokens, longer than the model's "
                            f"context of {block_size}; use a model with a larger block_size")
        good, bad = answer_tokens(task.name, example, tokenizer)
        rows.append(tokens)
        last.append(len(tokens) - 1)
        correct.append(good)
        alternative.append(bad)
    width = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = torch.tensor(row)
    return TaskBatch(padded, torch.tensor(last), torch.tensor(correct), torch.tensor(alternative),
                     [e.prompt for e in examples])


def candidate_logits(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """(N, T, V) full logits -> (N, 2) logits of [correct, alternative] at each prompt's last token."""
    device = logits.device  # the model's; the batch's indices live on the CPU
    at_last = logits[torch.arange(len(batch), device=device), batch.last.to(device)]
    return torch.stack([at_last.gather(-1, batch.correct.to(device)[:, None])[:, 0],
                        at_last.gather(-1, batch.alternative.to(device)[:, None])[:, 0]], dim=-1)


def binary_loss(pair_logits: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with column 0 the correct answer (nats)."""
    return F.cross_entropy(pair_logits, torch.zeros(len(pair_logits), dtype=torch.long, device=pair_logits.device))


def accuracy(pair_logits: torch.Tensor) -> float:
    return float((pair_logits[:, 0] > pair_logits[:, 1]).float().mean())


@torch.no_grad()
def evaluate_model(model, task: Task, tokenizer, split: str = "heldout", n: int = 512, seed: int = 0,
                   batch_size: int = 256) -> dict:
    batch = encode_examples(task, task.examples(split, n, seed), tokenizer, model.config.block_size)
    model.eval()
    device = next(model.parameters()).device  # wherever the model was put (--device)
    pair_logits = torch.cat([
        candidate_logits(model(batch.tokens[i:i + batch_size].to(device)), _slice(batch, i, i + batch_size))
        for i in range(0, len(batch), batch_size)]).float().cpu()
    return {"task": task.name, "loss": float(binary_loss(pair_logits)), "accuracy": accuracy(pair_logits),
            "n": len(batch)}


def _slice(batch: TaskBatch, start: int, stop: int) -> TaskBatch:
    return TaskBatch(batch.tokens[start:stop], batch.last[start:stop], batch.correct[start:stop],
                     batch.alternative[start:stop], batch.prompts[start:stop])
