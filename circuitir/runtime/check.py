"""check: does a circuit do what its header claims, on the model it came from? (DESIGN §5)

* sufficiency: the circuit alone (compiled, no model) reaches the target loss
  on held-out prompts the extraction never saw;
* necessity: the full model with only the circuit's nodes ablated loses the
  task (loss at least ``necessity_loss``, by default half of chance, ln 2 / 2);
* minimality: removing any single node pushes the loss over the target on
  the prompts the extraction selected nodes on (rebuilt from the header and
  measured afresh on the model: the file's claim, checked independently), with
  the same per-node figures on held-out prompts beside it;
* faithfulness: the compiled circuit equals the ablated model (max |Δlogit|
  ≤ 1e-4); the circuit's node set is measured under every ablation type (mean,
  zero, resample), as agreement with the full model's predictions; and a
  control: the same extraction on a re-initialised model of the same shape and
  sparsity must not reach the target with as few nodes.
"""

from __future__ import annotations

import math
import torch

from circuitir.errors import UserError
from circuitir.ir.ablation import fills_for, record_sites
from circuitir.ir.circuit import Circuit
from circuitir.ir.masked import ablate, device_of
from circuitir.ir.trace import trace
from circuitir.runtime.compile import compile_circuit
from circuitir.runtime.evaluate import pair_logits_from_candidates
from circuitir.tasks import get_task
from circuitir.tasks.evaluate import accuracy, binary_loss, candidate_logits, encode_examples

CHANCE = math.log(2)


def circuit_mask(circuit: Circuit, model) -> dict[str, torch.Tensor]:
    mask = {name: torch.zeros(site.width, dtype=torch.bool) for name, site in model.sites().items()}
    for node in circuit.kept_nodes():
        mask[node.site][node.index] = True
    return mask


def complement(mask: dict) -> dict:
    return {name: ~m for name, m in mask.items()}


def resample_fills(graph_ir, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Resample ablation's stand-ins: each prompt's channels take another prompt's values (same position)."""
    recorded = record_sites(graph_ir, torch.roll(tokens, shifts=1, dims=0))
    return {name: values.view(*tokens.shape, -1) for name, values in recorded.items()}


def check_source(circuit: Circuit, loaded) -> None:
    recorded = circuit.provenance.model_sha256
    if recorded is None:
        raise UserError("the circuit's header has no source.sha256, so it cannot be checked against a model")
    if recorded != loaded.sha256:
        raise UserError(f"this circuit was extracted from another model (source.sha256 {recorded[:12]}..., "
                        f"{loaded.path} is {loaded.sha256[:12]}...); check it against the model it came from")


class Checker:
    MASKS_PER_FORWARD = 8  # single-node removals evaluated together in minimality (the mask-batch dimension)
    def __init__(self, circuit: Circuit, loaded, n: int = 256, seed: int = 0, means: dict | None = None):
        check_source(circuit, loaded)
        self.circuit, self.loaded = circuit, loaded
        self.model = loaded.model
        provenance, claims = circuit.provenance, circuit.claims
        if provenance.task is None:
            raise UserError("the circuit's header names no task (task.name)")
        self.task = get_task(provenance.task)
        self.ablation = provenance.ablation.kind
        self.target = claims.target_loss
        if self.target is None:
            raise UserError("the circuit's header has no metrics.target_loss to check against")
        # The loss extraction aimed at on its selection prompts (the target less prune's margin).
        self.goal = claims.selection_goal
        self.scale, self.shift = circuit.calibration.scale, circuit.calibration.shift
        self.batch = encode_examples(self.task, self.task.examples("heldout", n, seed), loaded.tokenizer,
                                     loaded.config.block_size)
        self.mask = circuit_mask(circuit, self.model)
        self.means = means
        self.graph_ir = trace(self.model)

    @torch.no_grad()
    def model_pairs(self, keep: dict | None, kind: str, batch=None) -> torch.Tensor:
        batch = batch if batch is not None else self.batch
        if keep is None:
            return candidate_logits(self.model(batch.tokens.to(device_of(self.model))).cpu(), batch)
        if kind == "resample":
            fills = resample_fills(self.graph_ir, batch.tokens)
        else:
            fills = fills_for(self.model, kind, self.means)
        return candidate_logits(ablate(self.graph_ir, keep, fills)(batch.tokens).cpu(), batch)

    def loss(self, pairs: torch.Tensor) -> float:
        return float(binary_loss(pairs * self.scale))

    def sufficiency(self) -> dict:
        module = compile_circuit(self.circuit)
        with torch.no_grad():
            self.circuit_logits = module(self.batch.tokens)
        pairs = pair_logits_from_candidates(self.circuit_logits, self.batch, self.circuit.candidates)
        loss = float(binary_loss(pairs))
        return {"loss": loss, "target_loss": self.target, "accuracy": accuracy(pairs), "n": len(pairs),
                "passed": loss <= self.target}

    def necessity(self, threshold: float) -> dict:
        full = self.model_pairs(None, self.ablation)
        knocked = self.model_pairs(complement(self.mask), self.ablation)
        loss = float(binary_loss(knocked))
        return {"full_model_loss": float(binary_loss(full)), "ablated_loss": loss, "chance_loss": CHANCE,
                "accuracy": accuracy(knocked), "threshold": threshold, "passed": loss >= threshold}

    def selection_batch(self):
        """The prompts the extraction selected nodes on (prune's selection set), rebuilt from the header."""
        from circuitir.passes import parse_pipeline
        from circuitir.passes.prune import selection_batch
        provenance = self.circuit.provenance
        pipeline = provenance.pipeline
        prune = next((c for c in parse_pipeline(pipeline) if c.name == "prune"), None) if pipeline else None
        if prune is None:
            return None
        return selection_batch(self.task, self.loaded, prune.options.select, provenance.seed)

    def minimality(self, progress: bool) -> dict:
        """Per node: the loss without it, on the selection prompts (the claim extraction makes: every node
        is needed to meet the target there) and on the held-out prompts (how far that carries)."""
        from tqdm import tqdm

        selection = self.selection_batch()
        heldout_loss = self.evaluator(self.batch)
        selection_loss = self.evaluator(selection) if selection is not None else None
        nodes, rows = self.circuit.kept_nodes(), []
        with tqdm(total=len(nodes), desc="check: minimality", disable=not progress, leave=False) as bar:
            for start in range(0, len(nodes), self.MASKS_PER_FORWARD):
                chunk = nodes[start:start + self.MASKS_PER_FORWARD]
                masks = []
                for node in chunk:
                    keep = {name: m.clone() for name, m in self.mask.items()}
                    keep[node.site][node.index] = False
                    masks.append(keep)
                heldout = [self.loss(p) for p in heldout_loss.pair_logits_many(masks)]
                chosen = [self.loss(p) for p in selection_loss.pair_logits_many(masks)] if selection_loss else heldout
                for node, held, without in zip(chunk, heldout, chosen):
                    rows.append({"node": str(node), "loss_without_heldout": held,
                                 "necessary_heldout": held > self.target, "loss_without": without,
                                 "necessary": without > (self.goal if selection is not None else self.target)})
                bar.update(len(chunk))
        necessary = sum(r["necessary"] for r in rows)
        return {"measured_on": f"selection prompts, goal {self.goal}" if selection is not None
                else "held-out prompts",
                "nodes": rows, "necessary": necessary, "total": len(rows),
                "necessary_heldout": sum(r["necessary_heldout"] for r in rows),
                "passed": necessary == len(rows)}

    def evaluator(self, batch):
        """The task loss of masked graphs of the model on ``batch``, several masks per forward."""
        from circuitir.passes.prune import MaskedLoss
        return MaskedLoss(self.graph_ir, fills_for(self.graph_ir, self.ablation, self.means), batch)

    def controls(self, minimality: dict, seed: int = 0) -> dict:
        """The faithfulness curve with MIB's CPR/CMD, matched-size random circuits and partial ablation
        (``runtime/controls.py``), on the held-out prompts."""
        from circuitir.ir.ablation import site_widths
        from circuitir.runtime import controls
        heldout = self.evaluator(self.batch)
        widths = site_widths(self.graph_ir)
        full = self.loss(self.model_pairs(None, self.ablation))
        importance = {row["node"]: row["loss_without_heldout"] for row in minimality["nodes"]}
        ordered = sorted(self.circuit.kept_nodes(), key=lambda n: -importance[str(n)])
        return {
            "faithfulness_curve": controls.faithfulness_curve(heldout, widths, ordered, full, self.scale),
            "random_circuits": controls.random_circuits(heldout, widths, self.circuit.n_nodes, self.target,
                                                        seed=seed, scale=self.scale),
            "partial_ablation": controls.partial_ablation(heldout, self.mask, self.target, seed=seed,
                                                          scale=self.scale),
        }

    def faithfulness(self) -> dict:
        masked = self.model_pairs(self.mask, self.ablation)
        if not hasattr(self, "circuit_logits"):
            self.sufficiency()
        circuit_pairs = pair_logits_from_candidates(self.circuit_logits, self.batch, self.circuit.candidates)
        # Compared before the logit calibration (which the compiled circuit applies): the claim is that
        # the circuit computes what the ablated model computes; a fitted scale of, say, 80 would
        # otherwise turn float32 rounding into a failure.
        if self.scale != 0:
            circuit_pairs = (circuit_pairs - self.shift) / self.scale
        else:
            masked = masked * self.scale + self.shift
        max_diff = float((circuit_pairs - masked).abs().max())
        full = self.model_pairs(None, self.ablation)
        full_prediction = full[:, 0] > full[:, 1]
        by_ablation = {}
        for kind in ("mean", "zero", "resample"):
            if kind == "mean" and self.means is None and self.ablation != "mean":
                continue
            pairs = self.model_pairs(self.mask, kind) * self.scale
            agreement = float(((pairs[:, 0] > pairs[:, 1]) == full_prediction).float().mean())
            by_ablation[kind] = {"loss": float(binary_loss(pairs)), "accuracy": accuracy(pairs),
                                 "agreement_with_model": agreement}
        exact = max_diff <= 1e-4
        return {"max_abs_logit_diff": max_diff, "exact": exact, "ablations": by_ablation,
                "declared_ablation": self.ablation, "passed": exact}


def random_control(loaded, circuit: Circuit, pipeline: str, seed: int, progress: bool) -> dict:
    """Run the same extraction on a re-initialised model of the same shape and per-matrix density."""
    from circuitir.models.checkpoint import LoadedModel
    from circuitir.models.gpt import SparseGPT
    from circuitir.models.sparsity import project_
    from circuitir.runtime.extract import extract

    model = SparseGPT(loaded.config)
    model.reset_parameters(torch.Generator().manual_seed(seed + 12345))
    with torch.no_grad():
        for name, param in model.sparse_parameters().items():
            density = float((loaded.model.sparse_parameters()[name] != 0).float().mean())
            project_(param.data, density)
    model.eval()
    import hashlib
    identity = hashlib.sha256(f"random-reinit:{loaded.sha256}:{seed}".encode()).hexdigest()
    control = LoadedModel(model, loaded.tokenizer, identity, "random-reinit", dict(loaded.meta))
    task = get_task(circuit.provenance.task)
    try:
        found, _ = extract(control, task, pipeline=pipeline, seed=seed, progress=progress)
    except UserError as exc:  # the random model cannot reach the target at all
        return {"reached_target": False, "reason": str(exc), "passed": True}
    smaller = found.n_nodes <= circuit.n_nodes
    return {"reached_target": True, "nodes": found.n_nodes, "edges": found.n_edges,
            "circuit_nodes": circuit.n_nodes, "passed": not smaller}


def check(circuit: Circuit, loaded, *, n: int = 256, seed: int = 0, necessity_loss: float = CHANCE / 2,
          control: bool = True, progress: bool = True, nonsense: bool = False) -> dict:
    from circuitir.passes.ablate import declared_means
    check_source(circuit, loaded)
    means = declared_means(loaded, circuit.provenance)  # also the "mean" column when another ablation was declared
    checker = Checker(circuit, loaded, n=n, seed=seed, means=means)
    result = {"sufficiency": checker.sufficiency(), "necessity": checker.necessity(necessity_loss),
              "minimality": checker.minimality(progress), "faithfulness": checker.faithfulness()}
    if control:
        pipeline = circuit.provenance.pipeline
        result["faithfulness"]["control"] = random_control(loaded, circuit, pipeline, seed, progress)
        result["faithfulness"]["passed"] = (result["faithfulness"]["passed"]
                                            and result["faithfulness"]["control"]["passed"])
    result["controls"] = checker.controls(result["minimality"], seed)
    if nonsense:
        from circuitir.runtime.controls import nonsense_task
        result["controls"]["nonsense_task"] = nonsense_task(loaded, circuit, circuit.provenance.pipeline, seed,
                                                            progress)
    result["passed"] = all(result[k]["passed"] for k in ("sufficiency", "necessity", "minimality", "faithfulness"))
    return result
