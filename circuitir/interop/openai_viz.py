"""OpenAI's released circuits (``viz_data.pt``) as circuitir circuits.

OpenAI publishes its pruning results as ``viz/<model>/<task>/<sweep>/<k>/viz_data.pt``,
a ``torch.save`` of plain containers (read here with ``weights_only=True`` only):

* ``circuit_data``: location -> the kept channel indices (an integer tensor or
  list), locations named as circuitir's sites are (``0.mlp.post_act``,
  ``10.attn.q``, ``3.attn.resid_delta``, ``final_resid``, ...); a
  ``prune_config`` entry, when present, is the pruning run's settings;
* ``importances``: ``loss`` and ``interv_loss`` (the task loss of the full
  model and of the circuit, both stored at **twice** the per-sequence loss, as
  OpenAI's viewer notes), ``ch_interv_losses`` (location -> per-node loss
  when that node is ablated, also doubled, in the order of ``circuit_data``),
  ``beeg_model_config`` (the model's config), ``pair_data``, ``task_samples``;
* ``samples``: top/bottom activating contexts per channel (not imported).

:func:`import_viz` turns the kept channels into a node mask and lowers it with
:meth:`circuitir.ir.circuit.Circuit.from_mask` under circuitir's semantics:
mean ablation over circuitir's pretraining corpus, live norms, and sites
before AbsTopK (see :mod:`circuitir.models.gpt`). The result is an ordinary
circuit: it runs, checks and diffs like an extracted one, so ``circuitir diff``
can compare OpenAI's circuit for a task with circuitir's. Nodes with no path
to the logits under these semantics are dropped (dead-code elimination) and
counted in the summary; OpenAI's own losses are recorded (halved) in the
header under ``openai``.

The per-node importances (``ch_interv_losses``) become the header table
``openai.node_loss``, one line per node OpenAI kept (``openai.node_loss."0.mlp.post_act[3]"
= 0.21``: the task loss with that node ablated, halved), and the same mapping in
the summary (``import-viz --json``). They go in the header, not in ``label``
lines: a label says what a node responds to and ``explain`` rewrites generated
ones, while these are OpenAI's measurements under OpenAI's ablation, kept
beside their ``loss`` and ``interv_loss``, for every node they kept (also those
circuitir's lowering drops), where ``fmt``, ``diff`` and ``explain`` leave them.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from circuitir.errors import UserError

# Fields of OpenAI's config that fix the width of some site.
WIDTH_FIELDS = ("n_layer", "d_model", "n_head", "d_head", "d_mlp", "vocab_size")
NON_LOCATION_KEYS = ("prune_config",)
LOSS_SCALE = 2.0  # OpenAI stores every task loss at twice its value


def read_viz(path: str | Path) -> dict:
    """Load a viz_data.pt without unpickling arbitrary objects; its shape is checked, not trusted."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no such viz file: {path}") from None
    except Exception as exc:  # not a torch file, truncated, or a pickle of arbitrary objects
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read viz file {path}: {first[:200]} (OpenAI's viz_data.pt files load with "
                        "weights_only=True; is it complete?)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("circuit_data"), dict):
        raise UserError(f"{path} is not an OpenAI viz_data.pt file (no circuit_data mapping of locations to "
                        "kept channels)")
    return raw


def _config_of(viz: dict) -> dict | None:
    importances = viz.get("importances")
    config = importances.get("beeg_model_config") if isinstance(importances, dict) else None
    if config is not None and not isinstance(config, dict):
        config = {k: getattr(config, k) for k in WIDTH_FIELDS + ("n_mlp",) if hasattr(config, k)}
    if config and "d_mlp" not in config and "n_mlp" in config:
        config = {**config, "d_mlp": config["n_mlp"]}
    return config


def check_fits(viz: dict, model, path: str | Path) -> None:
    """Refuse a viz file made for another model, comparing every width its config states."""
    config = _config_of(viz)
    if not config:
        return
    mine = model.config
    for name in WIDTH_FIELDS:
        theirs = config.get(name)
        if name == "d_head" and theirs is None and config.get("d_model") and config.get("n_head"):
            theirs = config["d_model"] // config["n_head"]
        if name == "d_mlp" and theirs is None and config.get("d_model"):
            theirs = 4 * config["d_model"]
        if theirs is not None and theirs != getattr(mine, name):
            raise UserError(f"{path} is for another model: its config has {name} {theirs}, this model has "
                            f"{getattr(mine, name)}; import it with the model it was pruned on")


def kept_channels(viz: dict, model, path: str | Path) -> dict[str, list[int]]:
    """``{site: kept channel indices}`` in ``circuit_data``'s own order (a boolean mask: ascending), checked
    against the model's sites and widths."""
    sites = model.sites()
    kept_by_site = {}
    for location, kept in viz["circuit_data"].items():
        if location in NON_LOCATION_KEYS:
            continue
        if location not in sites:
            layer = str(location).split(".", 1)[0]
            n_layer = model.config.n_layer
            hint = (f" (this model has {n_layer} layer{'s' if n_layer != 1 else ''})" if layer.isdigit()
                    and int(layer) >= model.config.n_layer else "")
            raise UserError(f"{path}: location {location!r} is not a site of this model{hint}; known sites are "
                            "{L}.attn.act_in|q|k|v|resid_delta, {L}.mlp.act_in|post_act|resid_delta, final_resid")
        width = sites[location].width
        try:
            indices = torch.as_tensor(kept)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"{path}: circuit_data[{location!r}] is not a list of channel indices") from None
        if indices.dtype == torch.bool:
            if indices.shape != (width,):
                raise UserError(f"{path}: circuit_data[{location!r}] is a mask of {tuple(indices.shape)}, the "
                                f"site has {width} channels; the file is for another model")
            indices = indices.nonzero().flatten()
        elif indices.is_floating_point() or indices.is_complex() or indices.dim() > 1:
            raise UserError(f"{path}: circuit_data[{location!r}] is not a list of channel indices")
        indices = indices.flatten().long()
        outside = indices[(indices < 0) | (indices >= width)]
        if len(outside):
            raise UserError(f"{path}: circuit_data[{location!r}] keeps channel {int(outside[0])}, but the site "
                            f"has {width} channels; the file is for another model")
        kept_by_site[location] = indices.tolist()
    return kept_by_site


def viz_mask(kept_by_site: dict[str, list[int]], model) -> dict[str, torch.Tensor]:
    """``{site: bool tensor}`` of the kept channels (sites ``circuit_data`` does not name keep none)."""
    mask = {name: torch.zeros(site.width, dtype=torch.bool) for name, site in model.sites().items()}
    for location, indices in kept_by_site.items():
        mask[location][indices] = True
    return mask


def node_losses(viz: dict, kept_by_site: dict[str, list[int]], path: str | Path) -> dict[str, float]:
    """OpenAI's per-node importances: ``importances.ch_interv_losses`` (location -> the task loss with that
    one node ablated from their circuit, one per kept channel in ``circuit_data``'s order, stored doubled),
    halved, by node name (``0.mlp.post_act[3]``), in the file's order. Empty when the file has none."""
    importances = viz.get("importances")
    losses = importances.get("ch_interv_losses") if isinstance(importances, dict) else None
    if losses is None:
        return {}
    if not isinstance(losses, dict):
        raise UserError(f"{path}: importances['ch_interv_losses'] is not a mapping of locations to losses")
    out = {}
    for location, values in losses.items():
        if location not in kept_by_site:
            raise UserError(f"{path}: importances['ch_interv_losses'] has location {location!r}, which "
                            "circuit_data does not keep")
        try:
            values = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"{path}: importances['ch_interv_losses'][{location!r}] is not a list of "
                            "losses") from None
        kept = kept_by_site[location]
        if len(values) != len(kept):
            raise UserError(f"{path}: importances['ch_interv_losses'][{location!r}] has {len(values)} losses "
                            f"for the {len(kept)} channels circuit_data keeps there")
        for index, value in zip(kept, values):
            out[f"{location}[{index}]"] = value / LOSS_SCALE
    return out


def task_from_path(path: str | Path):
    """The registry task a viz path names (``.../bracket_counting_beeg/prune_v4/k_optim/viz_data.pt``)."""
    from circuitir.tasks import TASKS
    names = sorted(TASKS, key=len, reverse=True)
    for part in reversed(Path(path).resolve().parts):
        for name in names:
            if part == name or part.startswith(name + "_"):
                return TASKS[name]
    return None


def openai_losses(viz: dict, mask_nodes: int) -> dict:
    """OpenAI's own numbers, halved back to per-sequence losses."""
    importances = viz.get("importances") if isinstance(viz.get("importances"), dict) else {}
    out = {"nodes": mask_nodes}
    for key in ("loss", "interv_loss"):
        value = importances.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, (int, float)):
            out[key] = float(value) / LOSS_SCALE
    return out


def import_viz(path: str | Path, loaded, task, *, tokens: int = 65536, seed: int = 0, target: float = 0.15,
               heldout: int = 256) -> tuple:
    """Returns (circuit, summary): OpenAI's circuit for ``task`` on ``loaded``, lowered by circuitir."""
    from circuitir.ir.circuit import Circuit
    from circuitir.passes.ablate import pretrain_means
    from circuitir.runtime.evaluate import circuit_task_metrics
    from circuitir.runtime.extract import check_expressible, task_candidates

    started = time.time()
    viz = read_viz(path)
    check_fits(viz, loaded.model, path)
    kept_by_site = kept_channels(viz, loaded.model, path)
    losses = node_losses(viz, kept_by_site, path)
    mask = viz_mask(kept_by_site, loaded.model)
    imported = int(sum(int(m.sum()) for m in mask.values()))
    if imported == 0:
        raise UserError(f"{path}: circuit_data keeps no channels")
    check_expressible(task, loaded)
    candidates = task_candidates(task, loaded.tokenizer)
    means, info = pretrain_means(loaded, tokens, seed)
    with torch.no_grad():
        circuit = Circuit.from_mask(loaded.model, mask, ablation="mean", means=means, candidates=candidates)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    circuit.header = {
        "source": {"sha256": loaded.sha256, "file": str(loaded.path).rsplit("/", 1)[-1],
                   "tokenizer": loaded.tokenizer.spec},
        "task": {"name": task.name, "loss": "binary_ce_last_position",
                 "candidates": " ".join(repr(loaded.tokenizer.token_str(t)) for t in candidates)},
        "ablation": {"kind": "mean", "over": info["over"], "tokens": info["tokens"],
                     "corpus_sha256": info["corpus_sha256"]},
        "norm": "live",
        "seed": seed,
        "openai": {"viz_file": Path(path).name, "viz_sha256": digest, **openai_losses(viz, imported),
                   **({"node_loss": losses} if losses else {})},
    }
    circuit.verify()
    metrics = circuit_task_metrics(circuit, task, loaded.tokenizer, n=heldout)
    circuit.header["metrics"] = {"target_loss": target, "loss": metrics["loss"], "accuracy": metrics["accuracy"],
                                 "heldout_prompts": metrics["n"], "nodes": circuit.n_nodes,
                                 "edges": circuit.n_edges}
    summary = {"task": task.name, "imported_nodes": imported, "nodes": circuit.n_nodes,
               "dropped_nodes": imported - circuit.n_nodes, "edges": circuit.n_edges, "loss": metrics["loss"],
               "accuracy": metrics["accuracy"], "openai": circuit.header["openai"],
               "seconds": time.time() - started}
    return circuit, summary
