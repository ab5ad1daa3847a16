"""Weight-sparse (and dense baseline) pretraining on Python source.

The recipe follows the paper (Gao et al. 2025): Adam with β=(0.9, 0.95) and a
large eps, the whole gradient divided by its RMS every step, linear warmup and
decay, decoupled weight decay on matrices, and after every step a top-k
projection of every sparse matrix, with k annealed linearly from dense to the
target and the learning rate multiplied by sqrt(target/current density) while
annealing. ``dense=True`` trains the same architecture without projection.

A run is a pure function of its :class:`Recipe` (seed included): the same
recipe on the same machine gives the same weights, and a run resumed from a
checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from circuitir.data.corpus import Corpus, load_corpus
from circuitir.errors import UserError
from circuitir.models.checkpoint import load_model, save_checkpoint
from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT
from circuitir.models.sparsity import density_at, lr_at, project_
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.tasks import TASKS


@dataclass
class Recipe:
    model: dict = field(default_factory=dict)  # GPTConfig fields
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-2
    density: float = 1 / 16          # hidden matrices
    embed_density: float = 1 / 4     # wte / lm_head
    dense: bool = False
    anneal_start: float = 0.01
    anneal_end: float = 0.5
    warmup: float = 0.01
    adam_eps: float = 0.1
    weight_decay: float = 0.1
    min_per_neuron: int = 4
    task_mix: float = 0.0            # fraction of rows drawn from train-split task text
    seed: int = 0
    corpus: str | None = None        # directory of .py files; None = this interpreter's stdlib
    eval_every: int = 500
    checkpoint_every: int = 500

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Recipe] = {
    # For tests and smoke runs: seconds on one core.
    "tiny": Recipe(model=dict(n_layer=1, n_head=2, d_head=8, d_model=16, d_mlp=64, block_size=128),
                   steps=40, batch_size=8, lr=1e-2, density=1 / 4, embed_density=1 / 2,
                   eval_every=20, checkpoint_every=20),
    # The shipped models (models/README.md): about an hour on one CPU core.
    "small": Recipe(model=dict(n_layer=2, n_head=8, d_head=16, d_model=128, d_mlp=512, block_size=128),
                    steps=12000, batch_size=32, lr=1e-2, density=1 / 16, embed_density=1 / 4,
                    task_mix=0.25, eval_every=1000, checkpoint_every=500),
}


def task_text_pool(tokenizer, n_per_task: int = 3000, seed: int = 0) -> torch.Tensor:
    """Train-split task snippets (prompt + answer + continuation), shuffled and joined, as tokens."""
    snippets = []
    for task in TASKS.values():
        for example in task.examples("train", n_per_task, seed=seed):
            snippets.append(example.prompt + example.correct + example.completion)
    random.Random(seed).shuffle(snippets)
    return torch.tensor(tokenizer.encode("\n".join(snippets)), dtype=torch.long)


class Batches:
    """Random windows of the corpus, some rows replaced by task text; deterministic in the seed."""

    def __init__(self, tokens: torch.Tensor, pool: torch.Tensor | None, recipe: Recipe, block_size: int):
        self.tokens = tokens.long()
        self.pool = pool
        self.recipe = recipe
        self.block_size = block_size
        if len(self.tokens) <= block_size + 1:
            raise UserError(f"corpus: only {len(self.tokens)} tokens, fewer than one training window "
                            f"of {block_size + 1}; give --corpus a larger tree")

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step)
        rows = []
        for _ in range(self.recipe.batch_size):
            use_pool = self.pool is not None and torch.rand((), generator=generator) < self.recipe.task_mix
            source = self.pool if use_pool else self.tokens
            start = int(torch.randint(0, len(source) - self.block_size - 1, (), generator=generator))
            rows.append(source[start:start + self.block_size + 1])
        batch = torch.stack(rows)
        return batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def validation_loss(model: SparseGPT, tokens: torch.Tensor, windows: int = 64) -> float:
    block = model.config.block_size
    tokens = tokens.long()
    if len(tokens) <= block + 1:
        return float("nan")
    starts = torch.linspace(0, len(tokens) - block - 2, windows).long()
    batch = torch.stack([tokens[s:s + block + 1] for s in starts]).to(next(model.parameters()).device)
    logits = model(batch[:, :-1]).float()
    return float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))


def evaluate_tasks(model, tokenizer, n: int = 512) -> dict:
    """Held-out metrics of every task the model can take; a task it cannot (prompts longer than its
    context) is recorded with the reason instead of failing the run before its final checkpoint."""
    from circuitir.tasks.evaluate import evaluate_model
    out = {}
    for name, task in TASKS.items():
        try:
            out[name] = evaluate_model(model, task, tokenizer, "heldout", n)
        except UserError as exc:
            out[name] = {"task": name, "skipped": str(exc)}
    return out


def sparsify(model: SparseGPT, recipe: Recipe, density: float) -> None:
    for name, param in model.sparse_parameters().items():
        is_embedding = "wte" in name or "lm_head" in name
        target = recipe.embed_density if is_embedding else recipe.density
        # Each matrix anneals on the same schedule, scaled to its own target.
        current = 1.0 + (target - 1.0) * (1.0 - density) / (1.0 - recipe.density) if recipe.density < 1 else 1.0
        project_(param.data, current, recipe.min_per_neuron)


def weight_density(model: SparseGPT) -> dict[str, float]:
    return {name: float((p != 0).float().mean()) for name, p in model.sparse_parameters().items()}


def make_optimizer(model: SparseGPT, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only."""
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and p.requires_grad]
    others = [p for n, p in model.named_parameters() if p.dim() != 2 and p.requires_grad]
    return torch.optim.AdamW(
        [{"params": matrices, "weight_decay": recipe.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95), eps=recipe.adam_eps)


def train_step(model: SparseGPT, optimizer: torch.optim.Optimizer, recipe: Recipe, step: int,
               inputs: torch.Tensor, targets: torch.Tensor, forward=None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """One optimiser step at ``step``, top-k projection included; returns (loss, density).

    ``forward`` is what runs the batch (the DistributedDataParallel wrapper in a torchrun job, whose
    backward averages the gradients over ranks before the RMS normalisation, so every rank takes the
    same step and projects the same weights); ``dtype`` bfloat16 runs forward and backward under autocast."""
    density = 1.0 if recipe.dense else density_at(step, recipe.steps, recipe.density,
                                                  recipe.anneal_start, recipe.anneal_end)
    lr = lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
    if not recipe.dense:
        lr *= math.sqrt(recipe.density / density)
    for group in optimizer.param_groups:
        group["lr"] = lr
    forward = forward or model
    with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = forward(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    rms = torch.sqrt(sum(g.pow(2).sum() for g in grads) / sum(g.numel() for g in grads))
    for g in grads:
        g.div_(rms + 1e-5)
    optimizer.step()
    if not recipe.dense:
        sparsify(model, recipe, density)
    return loss.detach(), density


def train(recipe: Recipe, out_path: str, resume: str | None = None, progress: bool = True,
          log=None, device: str = "cpu", dtype: str = "float32", keep_every: int = 0) -> dict:
    """Train per ``recipe`` and write the checkpoint to ``out_path``; returns the final metrics.

    ``device``/``dtype``: see :mod:`circuitir.models.device`. Under torchrun every rank runs this with
    the same arguments: each takes its slice of every global batch (``recipe.batch_size`` rows in
    all, so the run equals one process with the same batch, up to float summation order), and only
    rank 0 evaluates, logs and writes checkpoints (atomically).

    ``keep_every``: also write a snapshot every that many steps to :func:`snapshot_path` (no optimiser
    state, its validation loss in ``metrics``). Snapshots do not change the run: same weights with or
    without them."""
    from tqdm import tqdm

    from circuitir.models.device import distributed_context, rank_device, resolve_device, resolve_dtype

    target_device, precision = resolve_device(device), resolve_dtype(dtype)
    dist_info = distributed_context(target_device)
    target_device = rank_device(target_device, dist_info)
    if recipe.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {recipe.batch_size} does not split over {dist_info.world_size} ranks; "
                        "use a multiple of the number of processes")
    torch.manual_seed(recipe.seed)
    tokenizer = ByteTokenizer()
    corpus: Corpus = load_corpus(recipe.corpus, tokenizer)
    config = GPTConfig.from_dict({"vocab_size": tokenizer.vocab_size, **recipe.model})
    model = SparseGPT(config)
    model.reset_parameters(torch.Generator().manual_seed(recipe.seed))
    model.to(target_device)
    optimizer = make_optimizer(model, recipe)
    start_step = 0
    history: list[dict] = []
    if resume:
        if str(resume).endswith(".safetensors"):
            raise UserError(f"cannot resume from {resume}: a .safetensors model has no optimiser state; "
                            "resume from the .pt checkpoint training wrote")
        raw = torch.load(resume, map_location="cpu", weights_only=True)
        if raw.get("recipe") != recipe.to_dict():
            raise UserError(f"cannot resume from {resume}: it was trained with a different recipe")
        model.load_state_dict(raw["state_dict"])
        optimizer.load_state_dict(raw["optimizer"])
        start_step = int(raw["step"])
        history = list(raw.get("history", []))
    pool = task_text_pool(tokenizer, seed=recipe.seed) if recipe.task_mix > 0 else None
    batches = Batches(corpus.train, pool, recipe, config.block_size)
    forward = model
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[target_device.index] if target_device.type == "cuda"
                                          else None)
    rows = recipe.batch_size // dist_info.world_size
    shard = slice(dist_info.rank * rows, (dist_info.rank + 1) * rows)

    training = {"world_size": dist_info.world_size, "device": target_device.type, "dtype": dtype}

    def checkpoint(step: int, metrics: dict | None = None) -> str | None:
        if not dist_info.is_main:  # one writer; the others wait at the next collective
            return None
        return save_checkpoint(out_path, model, tokenizer, recipe=recipe.to_dict(), corpus=corpus.describe(),
                               seed=recipe.seed, step=step, optimizer=optimizer.state_dict(),
                               history=history, metrics=metrics or {}, dense=recipe.dense, training=training)

    bar = tqdm(range(start_step, recipe.steps), initial=start_step, total=recipe.steps,
               disable=not progress or not dist_info.is_main,
               desc="dense" if recipe.dense else "sparse", unit="step", dynamic_ncols=True)
    started = time.time()
    tokens_seen = 0
    model.train()
    for step in bar:
        inputs, targets = batches.get(step)
        inputs, targets = inputs[shard].to(target_device), targets[shard].to(target_device)
        loss, density = train_step(model, optimizer, recipe, step, inputs, targets, forward, precision)
        tokens_seen += inputs.numel() * dist_info.world_size
        rate = tokens_seen / max(1e-9, time.time() - started)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}", density=f"{density:.3f}")
        done = step + 1
        if (done % recipe.eval_every == 0 or done == recipe.steps) and dist_info.is_main:
            record = {"step": done, "train_loss": float(loss), "val_loss": validation_loss(model, corpus.validation),
                      "density": density, "tokens_per_s": rate, "seconds": time.time() - started}
            model.train()
            history.append(record)
            if log is not None:
                log(record)
        if keep_every and done % keep_every == 0 and done != recipe.steps and dist_info.is_main:
            val = history[-1]["val_loss"] if history and history[-1]["step"] == done else \
                validation_loss(model, corpus.validation)
            model.train()
            save_checkpoint(snapshot_path(out_path, done), model, tokenizer, recipe=recipe.to_dict(),
                            corpus=corpus.describe(), seed=recipe.seed, step=done, history=history,
                            metrics={"val_loss": val}, dense=recipe.dense, snapshot_of=Path(out_path).name,
                            training=training)
        if done % recipe.checkpoint_every == 0 and done != recipe.steps:
            checkpoint(done)
    model.eval()
    metrics = {"val_loss": validation_loss(model, corpus.validation),
               "tasks": evaluate_tasks(model, tokenizer) if dist_info.is_main else {},
               "weight_density": weight_density(model),
               "train_seconds": time.time() - started}
    checkpoint(recipe.steps, metrics)
    if dist_info.active:
        import torch.distributed as dist
        dist.barrier()  # every rank returns once the one checkpoint is in place
    return metrics


def snapshot_path(out_path: str | Path, step: int) -> Path:
    """Where ``train(keep_every=...)`` writes the snapshot of ``step``: ``runs/dense.pt`` ->
    ``runs/dense-step3000.pt`` (same suffix, so ``.safetensors`` outputs give safetensors snapshots)."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}-step{step}{out.suffix}")


def load_for_resume(path: str) -> Recipe:
    loaded = load_model(path)
    recipe = loaded.meta.get("recipe")
    if not isinstance(recipe, dict):
        raise UserError(f"{path} records no training recipe, so it cannot be resumed (only a checkpoint that "
                        "`circuitir train` wrote can)")
    try:
        return Recipe(**recipe)
    except TypeError as exc:
        raise UserError(f"{path}: its recorded recipe does not fit this circuitir ({exc})") from None
