"""prune: the smallest set of nodes whose circuit still does the task.

The paper's procedure, then one step more:

1. *Learn*: one logit τ per node, clamped to [-1, 1], initialised ~N(0.1, 0.01).
   The forward pass keeps node i when τ_i > 0 (Heaviside); the backward pass
   uses the sigmoid's derivative (straight-through). Loss = task CE +
   λ·(number of kept nodes), AdamW with gradient clipping, on train prompts.
2. *Bisect*: order nodes by τ and find the smallest k whose top-k prefix meets
   the goal (target − margin) on a separate *selection* set of prompts.
3. *Minimise* (greedy): drop blocks of kept nodes, least important first,
   while the goal holds (blocks grow on success and halve on failure), then
   try each remaining node alone until none can go, so every node left is
   necessary on the selection set.
4. *Calibrate* (``calibrate=true``, off by default): fit a scalar scale of the
   candidate logits (LBFGS, bounded to [1/8, 8]) *inside* steps 2 and 3, so the
   circuit is minimal for the calibrated loss it reports. The paper fits scale
   and shift only after pruning; doing that lets a circuit pruned to the target
   uncalibrated report a far lower loss, and then almost none of its nodes are
   necessary. A common shift cannot change a binary loss, so the shift stays 0.

Selection uses train-split prompts (another seed), never the held-out split,
so ``check`` measures sufficiency on prompts the search never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from circuitir.errors import UserError
from circuitir.ir.masked import last_position_only, mask_graph
from circuitir.passes.manager import PipelineState, register
from circuitir.tasks.evaluate import binary_loss, encode_examples


class HeavisideSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        ctx.save_for_backward(logits)
        return (logits > 0).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        sig = torch.sigmoid(logits)
        return grad * sig * (1 - sig)


@dataclass
class PruneOptions:
    target: float = 0.15
    steps: int = 300
    lr: float = 0.01
    sparsity: float = 1e-3      # λ, per kept node
    prompts: int = 256          # train prompts for learning the mask
    select: int = 256           # train prompts (another seed) for bisection and greedy
    margin: float = 0.02        # selection aims at target - margin (the greedy step's winner's curse)
    batch: int = 64
    greedy: bool = True
    masks: int = 4              # masks per forward in greedy's single-node rounds (the mask-batch dimension)
    calibrate: bool = False    # fit a logit scale inside the search (see module docstring)

    def validate(self):
        if not 0 < self.target <= 100:
            raise UserError(f"pipeline: prune{{target}} must be in (0, 100], got {self.target}")
        if not 0 <= self.steps <= 1_000_000:
            raise UserError(f"pipeline: prune{{steps}} must be from 0 to 1,000,000, got {self.steps}")
        for name in ("prompts", "select"):
            if not 2 <= getattr(self, name) <= MAX_PROMPTS:
                raise UserError(f"pipeline: prune{{{name}}} must be from 2 to {MAX_PROMPTS:,}, got "
                                f"{getattr(self, name)}")
        if not 1 <= self.batch <= MAX_PROMPTS:
            raise UserError(f"pipeline: prune{{batch}} must be from 1 to {MAX_PROMPTS:,}, got {self.batch}")
        if not 1 <= self.masks <= 4096:
            raise UserError(f"pipeline: prune{{masks}} must be from 1 to 4096, got {self.masks}")
        if not 0 < self.lr <= 10:
            raise UserError(f"pipeline: prune{{lr}} must be in (0, 10], got {self.lr}")
        if not 0 <= self.sparsity <= 1000:
            raise UserError(f"pipeline: prune{{sparsity}} must be in [0, 1000], got {self.sparsity}")
        if not 0 <= self.margin <= 100:
            raise UserError(f"pipeline: prune{{margin}} must be in [0, 100], got {self.margin}")


MAX_PROMPTS = 100_000  # prune{prompts, select, batch}: beyond this, generating the prompts alone takes minutes


class MaskedTask:
    """Candidate logits of a masked graph (``ir/masked.py``) on task prompts, for one mask or many.

    Three things make an evaluation cheap, none of which changes what is computed (up to float
    rounding): ``M`` masks run in one forward (the graph's mask-batch dimension); prompts run in
    buckets of similar length, each cut to its longest prompt (causal attention: nothing after a
    prompt's last token reaches its logits there); and the graph is rewritten to compute the last MLP
    and the unembedding only at each prompt's last position (``last_position_only``).
    """

    def __init__(self, graph_ir, fills, rows: int = 32):
        self.graph = mask_graph(graph_ir, fills)
        self.last_only = last_position_only(self.graph, graph_ir)
        self.rows = rows

    def pairs(self, masks: dict, batch) -> torch.Tensor:
        """(M, N, 2) [correct, alternative] logits under ``masks`` ({site: (M, W) or (W,)})."""
        self.graph.set_masks(masks)
        device = self.graph.device
        order = torch.argsort(batch.last, stable=True)
        parts = []
        for rows in order.split(self.rows):
            length = int(batch.last[rows].max()) + 1
            tokens, last = batch.tokens[rows, :length].to(device), batch.last[rows].to(device)
            if self.last_only:
                at_last = self.graph(tokens, last)[:, :, 0].cpu()             # (M, b, V)
            else:
                at_last = self.graph(tokens)[:, torch.arange(len(rows), device=device), last].cpu()
            parts.append(torch.stack([at_last.gather(-1, batch.correct[rows].expand(len(at_last), -1)[..., None]),
                                      at_last.gather(-1, batch.alternative[rows].expand(len(at_last), -1)[..., None])],
                                     dim=-1)[..., 0, :])
        pairs = torch.cat(parts, dim=1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return pairs[:, inverse]


class MaskedLoss:
    """Task loss under a node mask (or many at once) on one fixed batch of prompts."""

    def __init__(self, graph_ir, fills, batch, calibrate: bool = False):
        self.task = MaskedTask(graph_ir, fills)
        self.batch, self.calibrate = batch, calibrate
        self.evaluations = 0

    @torch.no_grad()
    def pair_logits_many(self, masks: list[dict]) -> torch.Tensor:
        self.evaluations += len(masks)
        return self.task.pairs({site: torch.stack([mask[site] for mask in masks]) for site in masks[0]}, self.batch)

    def pair_logits(self, mask: dict) -> torch.Tensor:
        return self.pair_logits_many([mask])[0]

    def losses(self, masks: list[dict]) -> list[float]:
        out = []
        for pairs in self.pair_logits_many(masks):
            scale = fit_scale(pairs) if self.calibrate else 1.0
            out.append(float(binary_loss(pairs * scale)))
        return out

    def __call__(self, mask: dict) -> float:
        return self.losses([mask])[0]


def node_list(model) -> list[tuple[str, int]]:
    return [(name, i) for name, site in model.sites().items() for i in range(site.width)]


def mask_of(model, nodes) -> dict:
    mask = {name: torch.zeros(site.width, dtype=torch.bool) for name, site in model.sites().items()}
    for site, index in nodes:
        mask[site][index] = True
    return mask


def learn_logits(graph_ir, fills, batch, options: PruneOptions, seed: int, progress: bool) -> dict:
    """One logit per node, learned through the masked graph (the source model is not touched: its
    parameters are read, never given gradients)."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    widths = {name: info.width for name, info in graph_ir.sites.items()}
    logits = {name: (0.1 + 0.01 * torch.randn(width, generator=generator)).requires_grad_()
              for name, width in widths.items()}
    optimizer = torch.optim.AdamW(list(logits.values()), lr=options.lr, weight_decay=0.0)
    bar = tqdm(range(options.steps), desc="prune: learn mask", disable=not progress, unit="step",
               dynamic_ncols=True, leave=False)
    n = len(batch.tokens)
    task = MaskedTask(graph_ir, fills)
    for step in bar:
        rows = torch.randint(0, n, (min(options.batch, n),), generator=generator)
        keep = {name: HeavisideSTE.apply(value) for name, value in logits.items()}
        task_loss = binary_loss(task.pairs(keep, _rows(batch, rows))[0])
        kept = sum(mask.sum() for mask in keep.values())
        loss = task_loss + options.sparsity * kept
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(logits.values()), 1.0)
        optimizer.step()
        with torch.no_grad():
            for value in logits.values():
                value.clamp_(-1.0, 1.0)
        bar.set_postfix(task_loss=f"{float(task_loss.detach()):.3f}", kept=int(kept.detach()))
    return {name: value.detach() for name, value in logits.items()}


def _rows(batch, rows):
    from circuitir.tasks.evaluate import TaskBatch
    return TaskBatch(batch.tokens[rows], batch.last[rows], batch.correct[rows], batch.alternative[rows],
                     [batch.prompts[i] for i in rows.tolist()])


def bisect(order, loss_of, target: float) -> tuple[int, float]:
    """Smallest k with loss(top-k) <= target, assuming loss falls as k grows; returns (k, loss)."""
    lo, hi = 0, len(order)
    best = loss_of(order[:hi])
    while lo < hi:
        mid = (lo + hi) // 2
        value = loss_of(order[:mid])
        if value <= target:
            hi, best = mid, value
        else:
            lo = mid + 1
    return hi, best


def greedy_minimise(kept, loss_of, target: float, progress: bool, losses_of=None, width: int = 1) -> tuple[list, float]:
    """Drop nodes (least important first) while the target holds, until every node is necessary.

    Two phases. *Blocks*: walk the kept nodes from least to most important, trying to drop a block
    at a time; a block whose removal keeps the target is dropped and the next block is twice as
    large, one that breaks it is halved, down to a single node. When bisection keeps thousands of
    nodes of which a hundred matter, this costs a few hundred evaluations instead of thousands.
    *Singles*: then nodes are tried one at a time until none can go. A node is *verified* once its
    removal failed against the kept set as it is then; each drop changes the set, so only nodes
    verified before the last drop are tested again. With ``losses_of`` (many kept sets -> their
    losses, one batched forward), the next ``width`` removals are evaluated together against the
    same kept set and taken in order up to the first that succeeds: the trials after it are
    discarded and redone against the smaller set, so the result is the one-at-a-time result.
    """
    search = _Minimiser(list(kept), loss_of, target, progress, losses_of, width)
    search.drop_blocks()
    search.drop_singles()
    return search.kept, search.current


class _Minimiser:
    def __init__(self, kept, loss_of, target, progress, losses_of=None, width=1):
        self.kept, self.loss_of, self.target, self.progress = kept, loss_of, target, progress
        self.losses_of = losses_of or (lambda sets: [loss_of(s) for s in sets])
        self.width = max(1, width)
        self.current = loss_of(kept)
        self.drops = 0
        self.verified_at: dict = {}  # node -> number of drops when its removal last failed

    def _try(self, block: set) -> bool:
        trial = [n for n in self.kept if n not in block]
        value = self.loss_of(trial)
        if value <= self.target:
            self.kept, self.current = trial, value
            self.drops += 1
            return True
        if len(block) == 1:
            self.verified_at[next(iter(block))] = self.drops
        return False

    def _bar(self, total, desc):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    def drop_blocks(self):
        queue = list(reversed(self.kept))  # least important first
        size, start = max(1, len(queue) // 16), 0
        with self._bar(len(queue), "prune: minimise (blocks)") as bar:
            while start < len(queue):
                block = set(queue[start:start + size])
                if self._try(block):
                    start += len(block)
                    bar.update(len(block))
                    size *= 2
                elif size > 1:
                    size //= 2
                else:
                    start += 1
                    bar.update(1)
                bar.set_postfix(kept=len(self.kept), loss=f"{self.current:.3f}")

    def drop_singles(self):
        rounds = 0
        while True:
            pending = [n for n in reversed(self.kept) if self.verified_at.get(n) != self.drops]
            if not pending:
                return
            rounds += 1
            with self._bar(len(pending), f"prune: minimise (round {rounds})") as bar:
                start = 0
                while start < len(pending):
                    batch = [n for n in pending[start:start + self.width]]
                    values = self.losses_of([[n for n in self.kept if n != node] for node in batch])
                    for node, value in zip(batch, values):
                        start += 1
                        bar.update(1)
                        if value <= self.target:
                            self.kept, self.current = [n for n in self.kept if n != node], value
                            self.drops += 1
                            break  # later trials in this batch saw the old kept set: redo them
                        self.verified_at[node] = self.drops
                    bar.set_postfix(kept=len(self.kept), loss=f"{self.current:.3f}")


MAX_SCALE = 8.0


def fit_scale(pair_logits: torch.Tensor, steps: int = 16) -> float:
    """The scalar s in [1/8, 8] minimising the binary loss of s * logits (LBFGS)."""
    scale = torch.ones((), requires_grad=True)
    optimizer = torch.optim.LBFGS([scale], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = binary_loss(pair_logits * scale)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(scale.detach())
    if not math.isfinite(value):
        return 1.0
    # Bounded: on prompts the circuit separates perfectly the best scale is infinite, and a huge
    # scale would make "loss <= target" mean only "right on every selection prompt".
    return float(min(MAX_SCALE, max(1.0 / MAX_SCALE, value)))


def selection_batch(task, loaded, n: int, seed: int):
    """The prompts bisection and greedy select nodes on: train-split prompts drawn with seed + 1, apart
    from the mask-learning prompts (seed) and from every held-out prompt. ``check`` rebuilds them from a
    circuit's header to test its minimality claim, so this is the one place that says which they are."""
    return encode_examples(task, task.examples("train", n, seed + 1), loaded.tokenizer, loaded.config.block_size)


@register("prune", PruneOptions, needs=("graph", "ablation"), provides=("mask",),
          summary="learn node masks (Heaviside/sigmoid STE), bisect on k, then drop every unnecessary node")
def prune(state: PipelineState, options: PruneOptions) -> None:
    loaded, task = state.loaded, state.task
    model, fills, graph_ir = loaded.model, state.ablation["fills"], state.graph
    block = loaded.config.block_size
    train_batch = encode_examples(task, task.examples("train", options.prompts, state.seed), loaded.tokenizer, block)
    select_batch = selection_batch(task, loaded, options.select, state.seed)
    select_loss = MaskedLoss(graph_ir, fills, select_batch, options.calibrate)
    nodes = node_list(model)
    full = select_loss(mask_of(model, nodes))
    if full > options.target:
        raise UserError(f"the full model's loss on {task.name} is {full:.4f} nats, above the target "
                        f"{options.target}; no circuit of it can be expected to reach the target "
                        f"(raise --target-loss to at least {full:.3f})")
    # Greedy dropping stops where the selection loss is just under its goal, so the circuit fits the
    # selection prompts' noise; aiming a margin lower keeps the held-out loss under the target. A model
    # that cannot reach the lower goal gets the target itself (recorded in the metrics).
    lower = options.target - options.margin
    goal = lower if 0 < lower and full <= lower else options.target
    # The learned mask does not depend on the target, margin or what follows it: a frontier over targets
    # learns it once (the key holds everything it does depend on).
    key = ("learn_logits", task.name, state.seed, id(fills), options.steps, options.lr, options.sparsity,
           options.prompts, options.batch)
    if key not in state.memo:
        torch.manual_seed(state.seed)
        state.memo[key] = learn_logits(graph_ir, fills, train_batch, options, state.seed, state.progress)
    logits = state.memo[key]
    rank = {node: i for i, node in enumerate(nodes)}
    order = sorted(nodes, key=lambda n: (-float(logits[n[0]][n[1]]), rank[n]))

    def loss_of(kept):
        return select_loss(mask_of(model, kept))

    def losses_of(candidates):
        return select_loss.losses([mask_of(model, kept) for kept in candidates])

    k, bisect_loss = bisect(order, loss_of, goal)
    kept = order[:k]
    state.metrics["prune"] = {"full_model_loss": full, "selection_goal": goal, "bisect_nodes": k,
                              "bisect_loss": bisect_loss,
                              "learned_kept": int(sum(int((v > 0).sum()) for v in logits.values()))}
    if options.greedy:
        kept, final = greedy_minimise(kept, loss_of, goal, state.progress, losses_of, options.masks)
    else:
        final = bisect_loss
    state.metrics["prune"].update({"nodes": len(kept), "selection_loss": final,
                                   "evaluations": select_loss.evaluations})
    state.mask = mask_of(model, kept)
    if options.calibrate:
        scale = fit_scale(select_loss.pair_logits(state.mask))
        state.calibration = {"scale": scale, "shift": 0.0}
