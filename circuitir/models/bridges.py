"""Bridges: encoders and decoders coupling a weight-sparse model to a dense one (Gao et al. 2025, bridges).

One bridge per sublayer boundary (``ir/bridge.py: boundaries``): an encoder
dense->sparse ``AbsTopK(Linear)`` and a decoder sparse->dense ``Linear`` between the
two residual streams. The objective (``bridge_loss``):

    lm * CE(sparse)                                      (joint mode only)
  + nmse * Σ_i [NMSE(enc_i(h^d_i), h^s_i) + NMSE(dec_i(h^s_i), h^d_i)]
  + kl   * Σ_i [KL(y^d ‖ sparse suffix(enc_i(h^d_i))) + KL(y^d ‖ dense suffix(dec_i(h^s_i)))]

NMSE is the MSE divided by the variance of the target (each channel centred on its
own mean, averaged over channels); KL is per token, averaged over tokens.

Two modes: ``--sparse M.pt`` fits only the bridges to two frozen models (from least squares, or,
with ``--bridges-from``, from an existing bridged checkpoint's maps, ``--fit`` choosing which side);
without it a new weight-sparse model is trained jointly with its bridges (the
paper's objective, the sparse model's pretraining loss included), with
``train.py``'s recipe: annealed top-k projection (≥4 per neuron), gradient RMS
normalisation, warmup/decay. The bridged checkpoint is the sparse model in the
normal checkpoint layout (every command loads it as a plain sparse model) plus
``bridge`` (weights), ``bridge_config`` and both models' sha256.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from circuitir.errors import UserError
from circuitir.models.gpt import AbsTopK


def _key(point: str) -> str:
    return point.replace(".", "_")


class Encoder(nn.Module):
    """dense -> sparse residual: ``AbsTopK(Linear)``."""

    def __init__(self, d_in: int, d_out: int, k: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.topk = AbsTopK(min(k, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.topk(self.linear(x))


class Bridges(nn.Module):
    """Encoders (dense->sparse) and decoders (sparse->dense), one each per boundary."""

    def __init__(self, points: list[str], d_dense: int, d_sparse: int, encoder_k: int):
        super().__init__()
        self.points = list(points)
        self.encoders = nn.ModuleDict({_key(p): Encoder(d_dense, d_sparse, encoder_k) for p in points})
        self.decoders = nn.ModuleDict({_key(p): nn.Linear(d_sparse, d_dense) for p in points})

    def encoder(self, point: str) -> Encoder:
        return self.encoders[_key(point)]

    def decoder(self, point: str) -> nn.Linear:
        return self.decoders[_key(point)]

    def config(self) -> dict:
        enc = next(iter(self.encoders.values()))
        return {"points": self.points, "d_dense": enc.linear.in_features, "d_sparse": enc.linear.out_features,
                "encoder_k": enc.topk.k}

    @classmethod
    def from_config(cls, config: dict) -> "Bridges":
        return cls(config["points"], config["d_dense"], config["d_sparse"], config["encoder_k"])

    @torch.no_grad()
    def fit_least_squares(self, dense_h: dict, sparse_h: dict, ridge: float = 1e-3) -> None:
        """Start every map at the ridge-regression solution on one batch (the top-k then acts on it)."""
        for point in self.points:
            for linear, x, y in ((self.encoder(point).linear, dense_h[point], sparse_h[point]),
                                 (self.decoder(point), sparse_h[point], dense_h[point])):
                x2, y2 = x.flatten(0, -2).double(), y.flatten(0, -2).double()
                xa = torch.cat([x2, torch.ones(len(x2), 1, dtype=x2.dtype)], 1)
                gram = xa.T @ xa
                gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
                solution = torch.linalg.solve(gram, xa.T @ y2)
                linear.weight.copy_(solution[:-1].T.float())
                linear.bias.copy_(solution[-1].float())


def nmse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE / variance of the target; the variance centres each channel on its mean over all tokens."""
    flat = target.flatten(0, -2)
    variance = (flat - flat.mean(0, keepdim=True)).pow(2).mean()
    return (prediction - target).pow(2).mean() / variance.clamp_min(1e-12)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_reference ‖ p) per token, averaged over tokens (nats)."""
    ref = F.log_softmax(reference_logits.float(), -1)
    other = F.log_softmax(logits.float(), -1)
    return (ref.exp() * (ref - other)).sum(-1).mean()


@dataclass
class BridgeRecipe:
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    warmup: float = 0.02
    nmse_weight: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 1.0            # joint mode: the sparse model's pretraining loss
    encoder_k: int = 0                # 0: the sparse model's residual width (no AbsTopK pruning)
    least_squares_init: bool = True
    seed: int = 0
    joint: bool = False               # train a sparse model with its bridges
    init_sparse_sha256: str = ""      # joint mode warm-started from this sparse model (its density kept)
    fit: str = "all"                  # fit mode: which maps are trained ("all", "decoders", "encoders")
    init_bridges_sha256: str = ""     # fit mode: the maps started from this bridged checkpoint's bridges
    sparse_recipe: dict = dataclasses.field(default_factory=dict)  # train.Recipe fields (joint mode)
    eval_every: int = 100
    checkpoint_every: int = 100

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class BridgeObjective(nn.Module):
    """Computes every term of the objective from the two models' residual streams.

    The dense model is always frozen; the sparse model's graphs are ``live`` in joint
    mode (its weights get gradients through its own LM loss and through both hybrids)."""

    def __init__(self, dense_model, sparse_model, bridges: Bridges, live_sparse: bool):
        super().__init__()
        from circuitir.ir.bridge import residuals, suffix
        from circuitir.ir.trace import trace
        dense_ir, sparse_ir = trace(dense_model), trace(sparse_model)
        self.bridges = bridges
        self.points = bridges.points
        self.dense_residuals = residuals(dense_ir)
        self.sparse_residuals = residuals(sparse_ir, live=live_sparse)
        self.dense_suffix = nn.ModuleDict({_key(p): suffix(dense_ir, p) for p in self.points})
        self.sparse_suffix = nn.ModuleDict({_key(p): suffix(sparse_ir, p, live=live_sparse) for p in self.points})
        for module in (self.dense_residuals, self.dense_suffix):
            module.requires_grad_(False)

    def residual_streams(self, idx):
        with torch.no_grad():
            dense_logits, dense_h = self.dense_residuals(idx)
        sparse_logits, sparse_h = self.sparse_residuals(idx)
        return dense_logits, dense_h, sparse_logits, sparse_h

    def forward(self, idx, targets=None, weights: BridgeRecipe | None = None) -> tuple[torch.Tensor, dict]:
        weights = weights or BridgeRecipe()
        dense_logits, dense_h, sparse_logits, sparse_h = self.residual_streams(idx)
        terms = {}
        total = torch.zeros(())
        if targets is not None and weights.lm_weight:
            terms["lm"] = F.cross_entropy(sparse_logits.flatten(0, 1), targets.flatten())
            total = total + weights.lm_weight * terms["lm"]
        # A map that is not trained (``fit``) contributes a constant: its terms are not computed. The NMSE
        # terms are summed before the KL terms, as the objective reads, so fitting every map gives the same
        # numbers bit for bit as the whole objective.
        trained = {"enc": weights.fit in ("all", "encoders"), "dec": weights.fit in ("all", "decoders")}
        for p in self.points:
            k = _key(p)
            nmses, kls = [], []
            for side, hybrid, bridge, source, target, rest in (
                    ("enc", "d2s", self.bridges.encoder(p), dense_h, sparse_h, self.sparse_suffix[k]),
                    ("dec", "s2d", self.bridges.decoder(p), sparse_h, dense_h, self.dense_suffix[k])):
                if not trained[side]:
                    continue
                mapped = bridge(source[p])
                terms[f"nmse_{side}/{p}"] = nmse(mapped, target[p])
                nmses.append(terms[f"nmse_{side}/{p}"])
                if weights.kl_weight:
                    terms[f"kl_{hybrid}/{p}"] = kl_divergence(dense_logits, rest(idx, mapped))
                    kls.append(terms[f"kl_{hybrid}/{p}"])
            total = total + weights.nmse_weight * sum(nmses)
            if kls:
                total = total + weights.kl_weight * sum(kls)
        return total, {name: float(value.detach()) for name, value in terms.items()}


def default_encoder_k(sparse_config) -> int:
    return sparse_config.d_model


def tokenizer_spec(loaded):
    """The tokenizer a checkpoint records (its spec as written, so two specs that load the same way but
    differ are told apart), or the loaded tokenizer's."""
    return loaded.meta.get("tokenizer") or getattr(loaded.tokenizer, "spec", None)


def load_bridged(path, dense=None):
    """(LoadedModel of the sparse model, Bridges) from a bridged checkpoint; with ``dense`` (a
    LoadedModel), check that it is the dense model the bridges were fitted to."""
    from circuitir.models.checkpoint import load_model
    loaded = load_model(path)
    meta = loaded.meta
    if "bridge" not in meta or "bridge_config" not in meta:
        raise UserError(f"{path} is not a bridged checkpoint (no bridge weights); make one with "
                        "`circuitir bridge train`")
    bridges = Bridges.from_config(meta["bridge_config"])
    bridges.load_state_dict(meta["bridge"])
    bridges.eval()
    if dense is not None:
        if meta.get("dense_sha256") != dense.sha256:
            raise UserError(f"{dense.path} is not the dense model {path} was bridged to (sha256 "
                            f"{dense.sha256[:12]}, the checkpoint records {str(meta.get('dense_sha256'))[:12]})")
        if tokenizer_spec(dense) != tokenizer_spec(loaded):
            raise UserError(f"{dense.path} uses a different tokenizer from {path}")
    return loaded, bridges


def _lr_at(step: int, recipe: BridgeRecipe) -> float:
    from circuitir.models.sparsity import lr_at
    return lr_at(step, recipe.steps, recipe.lr, recipe.warmup)


def train_bridges(dense_path: str, out_path: str, sparse_path: str | None = None,
                  recipe: BridgeRecipe | None = None, resume: str | None = None, progress: bool = True,
                  log=None, device: str = "cpu", init_sparse: str | None = None,
                  init_bridges: str | None = None) -> dict:
    """Fit bridges (``sparse_path``: both models frozen) or train a sparse model jointly with them.

    Joint mode starts from a fresh sparse model (``recipe.sparse_recipe``, annealed to its density as
    ``train`` does) or, with ``init_sparse``, from that trained sparse model: its weights are trained on
    with the bridges at its own density (every step projected back to it), a fine-tune far cheaper than a
    whole joint pretraining run.

    In fit mode, ``init_bridges`` (a bridged checkpoint of the same dense and sparse models) starts the maps
    from its bridges instead of least squares, and ``recipe.fit`` picks the maps trained ("decoders" or
    "encoders"; the others are kept as they start): a refinement of existing bridges, e.g. decoders refitted
    with other term weights.

    Everything is initialised on the CPU (so the seed gives the same start on any device), then moved to
    ``device``; checkpoints are written from CPU copies, so a file never holds device tensors."""
    from tqdm import tqdm

    from circuitir.data.corpus import load_corpus
    from circuitir.ir.bridge import boundaries
    from circuitir.models.checkpoint import load_model
    from circuitir.models.config import GPTConfig
    from circuitir.models.gpt import SparseGPT
    from circuitir.models.train import Batches, Recipe, make_optimizer, sparsify, task_text_pool, validation_loss
    from circuitir.models.sparsity import density_at

    recipe = recipe or BridgeRecipe()
    if resume:
        raw = torch.load(resume, map_location="cpu", weights_only=True)
        if "bridge_recipe" not in raw:
            raise UserError(f"cannot resume from {resume}: not a bridge training checkpoint")
        recipe = BridgeRecipe(**raw["bridge_recipe"])
        sparse_path = raw.get("sparse_path")
    recipe.joint = sparse_path is None
    if recipe.fit not in ("all", "decoders", "encoders"):
        raise UserError(f"fit must be all, decoders or encoders, got {recipe.fit!r}")
    if recipe.joint and (recipe.fit != "all" or init_bridges is not None):
        raise UserError("--fit and --bridges-from refine the bridges of two frozen models: give --sparse")
    torch.manual_seed(recipe.seed)
    dense = load_model(dense_path)
    dense.model.requires_grad_(False)
    tokenizer = dense.tokenizer
    if tokenizer is None:
        raise UserError(f"{dense_path} has no tokenizer spec")
    if sparse_path is not None:
        sparse = load_model(sparse_path)
        if tokenizer_spec(sparse) != tokenizer_spec(dense):
            raise UserError(f"{sparse_path} uses a different tokenizer from {dense_path}")
        sparse_model, sparse_sha, sparse_meta = sparse.model, sparse.sha256, dict(sparse.meta)
        sparse_model.requires_grad_(False)
        sparse_train = Recipe(**sparse_meta["recipe"]) if "recipe" in sparse_meta else Recipe()
    elif init_sparse is not None and not resume:
        start = load_model(init_sparse)
        if tokenizer_spec(start) != tokenizer_spec(dense):
            raise UserError(f"{init_sparse} uses a different tokenizer from {dense_path}")
        if start.meta.get("dense") or "recipe" not in start.meta:
            what = "was trained densely" if start.meta.get("dense") else "records no training recipe"
            raise UserError(f"{init_sparse} {what}, so it is not a weight-sparse model `circuitir train` made and "
                            "joint training has no density to keep; --init-sparse takes a sparse checkpoint of "
                            "`circuitir train`")
        sparse_model = start.model.train()  # as a fresh or resumed run's model (load_model returns eval mode)
        sparse_train = Recipe(**start.meta["recipe"])
        step = start.meta.get("step")

        def projected_after(k: int) -> float:
            """The density train's weights were last projected to after step k (at step index k - 1)."""
            return density_at(k - 1, sparse_train.steps, sparse_train.density, sparse_train.anneal_start,
                              sparse_train.anneal_end)
        # Above the recipe's density, every joint step would project the weights down to it at once.
        if step is not None and projected_after(step) > sparse_train.density:
            annealed = next(k for k in range(1, sparse_train.steps + 1) if projected_after(k) <= sparse_train.density)
            raise UserError(f"{init_sparse} is step {step} of {sparse_train.steps}, taken before its weights had "
                            f"annealed to density {sparse_train.density:g} (from step {annealed} on); warm-start "
                            "from a later snapshot or the run's final checkpoint")
        recipe.init_sparse_sha256 = start.sha256
        recipe.sparse_recipe = sparse_train.to_dict()  # what a resumed run rebuilds the model from
        sparse_sha, sparse_meta = None, {"recipe": sparse_train.to_dict()}
    else:
        sparse_train = Recipe(**{**Recipe().to_dict(), **recipe.sparse_recipe})
        config = GPTConfig.from_dict({"vocab_size": tokenizer.vocab_size, **sparse_train.model})
        sparse_model = SparseGPT(config)
        sparse_model.reset_parameters(torch.Generator().manual_seed(recipe.seed))
        sparse_sha, sparse_meta = None, {"recipe": sparse_train.to_dict()}
    start_bridges = None
    if init_bridges is not None and not resume:
        source, start_bridges = load_bridged(init_bridges, dense)
        theirs, ours = source.model.state_dict(), sparse_model.state_dict()
        if theirs.keys() != ours.keys() or any(not torch.equal(theirs[k], ours[k].cpu()) for k in ours):
            raise UserError(f"the bridges in {init_bridges} were fitted to another sparse model than "
                            f"{sparse_path}; give --sparse the sparse model they couple (the bridged "
                            f"checkpoint holds it: --sparse {init_bridges})")
        recipe.init_bridges_sha256 = source.sha256
    if sparse_model.config.n_layer != dense.model.config.n_layer:
        raise UserError("the dense and sparse models need the same number of layers to be bridged")
    if sparse_model.config.block_size != dense.model.config.block_size:
        raise UserError("the dense and sparse models need the same context length to be bridged")
    points = boundaries(dense.model.config)
    bridges = Bridges(points, dense.model.config.d_model, sparse_model.config.d_model,
                      recipe.encoder_k or default_encoder_k(sparse_model.config))
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    for param in bridges.parameters():  # deterministic init independent of the global RNG
        if param.dim() == 2:
            nn.init.normal_(param, 0.0, 1.0 / math.sqrt(param.shape[1]), generator=gen)
        else:
            nn.init.zeros_(param)
    if start_bridges is not None:
        if start_bridges.config() != bridges.config():
            raise UserError(f"the bridges in {init_bridges} have another shape ({start_bridges.config()}) than "
                            f"this run's ({bridges.config()}); leave out --encoder-k or give theirs")
        bridges.load_state_dict(start_bridges.state_dict())
    fitted = {"all": bridges, "decoders": bridges.decoders, "encoders": bridges.encoders}[recipe.fit]
    bridges.requires_grad_(False)
    fitted.requires_grad_(True)
    device = torch.device(device)
    for module in (dense.model, sparse_model, bridges):
        module.to(device)
    objective = BridgeObjective(dense.model, sparse_model, bridges, live_sparse=recipe.joint)

    corpus = load_corpus((dense.meta.get("recipe") or {}).get("corpus"), tokenizer)
    batch_recipe = Recipe(**{**sparse_train.to_dict(), "batch_size": recipe.batch_size, "seed": recipe.seed})
    pool = task_text_pool(tokenizer, seed=recipe.seed) if batch_recipe.task_mix > 0 else None
    batches = Batches(corpus.train, pool, batch_recipe, sparse_model.config.block_size)

    params = list(fitted.parameters())
    if recipe.joint:
        sparse_opt = make_optimizer(sparse_model, sparse_train)
        optimizer = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}] + sparse_opt.param_groups,
                                      lr=recipe.lr, betas=(0.9, 0.95))
    else:
        optimizer = torch.optim.Adam(params, lr=recipe.lr, betas=(0.9, 0.95))
    start_step, history = 0, []
    if resume:
        bridges.load_state_dict(raw["bridge"])
        if recipe.joint:
            sparse_model.load_state_dict(raw["state_dict"])
        optimizer.load_state_dict(raw["optimizer"])
        start_step, history = int(raw["step"]), list(raw.get("history", []))
    elif recipe.least_squares_init and start_bridges is None:
        # Several batches (thousands of tokens) so the 129-parameter-per-output fits do not overfit.
        inputs = torch.cat([batches.get(-1 - i)[0] for i in range(max(1, 64 // recipe.batch_size))]).to(device)
        with torch.no_grad():
            _, dense_h, _, sparse_h = objective.residual_streams(inputs)
        bridges.fit_least_squares(dense_h, sparse_h)

    dense_sha = dense.sha256

    def checkpoint(step: int, metrics: dict | None = None, final: bool = False) -> str:
        extra = {} if final else {"optimizer": on_cpu(optimizer.state_dict())}
        model = sparse_model if device.type == "cpu" else copy.deepcopy(sparse_model).cpu()
        # One JSON round trip for all plain metadata: pickle memoises shared objects (interned strings
        # included), so a resumed run, whose recipe came from a file, would otherwise differ in bytes.
        plain = json.loads(json.dumps(dict(
            recipe=sparse_meta.get("recipe"), corpus=sparse_meta.get("corpus", corpus.describe()), seed=recipe.seed,
            step=step, history=history, metrics=metrics or sparse_meta.get("metrics", {}), dense=False,
            bridge_config=bridges.config(), bridge_recipe=recipe.to_dict(), dense_sha256=dense_sha,
            sparse_sha256=sparse_sha, sparse_path=sparse_path)))
        return save_deterministic(out_path, model, tokenizer, **plain,
                                  bridge={k: v.detach().cpu().clone() for k, v in bridges.state_dict().items()},
                                  **extra)

    bar = tqdm(range(start_step, recipe.steps), initial=start_step, total=recipe.steps, disable=not progress,
               desc="bridge" + (" (joint)" if recipe.joint else ""), unit="step", dynamic_ncols=True)
    started = time.time()
    for step in bar:
        inputs, targets = (t.to(device) for t in batches.get(step))
        lr = _lr_at(step, recipe)
        density = 1.0
        if recipe.joint and recipe.init_sparse_sha256:
            density = sparse_train.density
        elif recipe.joint:
            density = density_at(step, recipe.steps, sparse_train.density, sparse_train.anneal_start,
                                 sparse_train.anneal_end)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr * (math.sqrt(sparse_train.density / density) if i > 0 else 1.0)
        loss, terms = objective(inputs, targets if recipe.joint else None, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.joint:  # train.py's whole-gradient RMS normalisation, for the sparse model's weights
            grads = [p.grad for p in sparse_model.parameters() if p.grad is not None]
            if grads:
                rms = torch.sqrt(sum(g.pow(2).sum() for g in grads) / sum(g.numel() for g in grads))
                for g in grads:
                    g.div_(rms + 1e-5)
        optimizer.step()
        if recipe.joint:
            sparsify(sparse_model, sparse_train, density)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        done = step + 1
        if done % recipe.eval_every == 0 or done == recipe.steps:
            record = {"step": done, "loss": float(loss.detach()), "seconds": time.time() - started,
                      **{k: round(v, 5) for k, v in terms.items()}}
            if recipe.joint:
                record["sparse_val_loss"] = validation_loss(sparse_model, corpus.validation)
            history.append({k: v for k, v in record.items() if k != "seconds"})  # bytes stay deterministic
            if log is not None:
                log(record)
        if done % recipe.checkpoint_every == 0 and done != recipe.steps:
            checkpoint(done)
    sparse_model.eval()
    metrics = dict(sparse_meta.get("metrics", {})) if not recipe.joint else {
        "val_loss": validation_loss(sparse_model, corpus.validation)}
    checkpoint(recipe.steps, metrics, final=True)
    return {"steps": recipe.steps, "last": history[-1] if history else {}}


def on_cpu(state):
    """A (nested) state dict with every tensor on the CPU; on the CPU itself, the same objects."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


def save_deterministic(path, model, tokenizer, **meta) -> str:
    """``checkpoint.save_checkpoint``'s layout, written through a file handle: ``torch.save`` to a path
    names the zip's records after the (random) temporary file, so the same weights would give different
    bytes; through a handle the records are named ``archive/`` and the same run gives the same file."""
    from circuitir.models.checkpoint import FORMAT, FORMAT_VERSION, atomic_path, file_sha256
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
               "tokenizer": tokenizer.spec, "state_dict": model.state_dict(), **meta}
    with atomic_path(path) as temp:
        with open(temp, "wb") as handle:
            torch.save(payload, handle)
    return file_sha256(path)


def log_to(path):
    handle = open(path, "a") if path else None

    def log(record):
        if handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
    return log
