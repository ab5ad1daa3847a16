"""Circuit speed: a compiled circuit against the full model on the same batch of task prompts.

A circuit of a few dozen nodes does a few dozen multiply-adds per token where
the model does millions, so ``compile_circuit(circuit)(tokens)`` must run much
faster than ``model(tokens)``. Both run on the same (N, T) batch of task
prompts, the model returning every vocabulary logit, the circuit its
candidates' logits; the two are measured interleaved (A, B, A, B, ... with the
order alternating each round) in one process, so that machine load drifts hit
both alike. The figure of merit is the ratio of median times, model / circuit.

It also checks what it times: the circuit's logits must equal the model's with
every node outside the circuit ablated (its declared mean or zero fills) to
1e-4, the defining property of ``compile`` (DESIGN §3).

The model is ``--model`` (default models/sparse.pt if it exists, else a random
SparseGPT of the ``small`` preset's shape, projected to the preset's weight
densities). The circuit is ``--circuit FILE.cir`` (from ``circuitir extract``
on that model), or else one lowered with ``Circuit.from_mask`` from a random
mask grown until dead-code elimination leaves ``--nodes`` kept nodes spread
over the sites.

    python benchmarks/circuit_speed.py            # about 30 seconds on one core
    python benchmarks/circuit_speed.py --quick    # a smoke run, about 10 seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from circuitir.errors import UserError
from circuitir.ir.ablation import ablate, fills_for
from circuitir.ir.circuit import Circuit
from circuitir.models.checkpoint import LoadedModel, load_model
from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT
from circuitir.models.sparsity import project_
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.models.train import PRESETS
from circuitir.runtime.check import circuit_mask
from circuitir.runtime.compile import compile_circuit
from circuitir.tasks import get_task
from circuitir.tasks.evaluate import encode_examples

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "sparse.pt"
TOLERANCE = 1e-4


def random_small_model(seed: int) -> LoadedModel:
    """A SparseGPT of the small preset's shape, GPT-2 initialised, projected to the preset's densities."""
    recipe = PRESETS["small"]
    model = SparseGPT(GPTConfig.from_dict({"vocab_size": ByteTokenizer.vocab_size, **recipe.model}))
    model.reset_parameters(torch.Generator().manual_seed(seed))
    for name, param in model.sparse_parameters().items():
        density = recipe.embed_density if ("wte" in name or "lm_head" in name) else recipe.density
        project_(param.data, density, recipe.min_per_neuron)
    return LoadedModel(model, ByteTokenizer(), sha256="", path="<random small-preset model>")


def load(path: str | None, seed: int) -> tuple[LoadedModel, str]:
    if path is None and not DEFAULT_MODEL.exists():
        recipe = PRESETS["small"]
        return random_small_model(seed), (f"random SparseGPT, small preset shape, weights projected to density "
                                          f"{recipe.density:g} (embeddings {recipe.embed_density:g})")
    loaded = load_model(path or DEFAULT_MODEL)
    return loaded, str(loaded.path)


def random_circuit(loaded: LoadedModel, task, n_nodes: int, ablation: str, seed: int,
                   sites_like: list[str] | None = None) -> tuple[Circuit, dict]:
    """A circuit of about ``n_nodes`` kept nodes from a random mask, spread round-robin over the sites.

    Dead-code elimination drops kept nodes with no path to the logits, so the mask is grown: the
    survivors of the last lowering plus fresh random nodes (one per site in turn) up to ``n_nodes``,
    lowered again, until every chosen node survives or the attempts run out."""
    from circuitir.passes.ablate import task_means
    from circuitir.runtime.extract import task_candidates

    model = loaded.model
    sites = model.sites()
    candidates = task_candidates(task, loaded.tokenizer)
    means = task_means(loaded, task, 4096, seed)[0] if ablation == "mean" else None
    generator = torch.Generator().manual_seed(seed)
    chosen: set[tuple[str, int]] = set()
    names = [name for name in sites if not sites_like or any(part in name for part in sites_like)]
    if not names:
        raise UserError(f"--sites {','.join(sites_like)} matches no site (sites: {', '.join(sites)})")
    circuit = None
    for _ in range(30):
        order = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
        turn = 0
        while len(chosen) < n_nodes:
            site = order[turn % len(order)]
            chosen.add((site, int(torch.randint(0, sites[site].width, (), generator=generator))))
            turn += 1
        mask = {name: torch.zeros(site.width, dtype=torch.bool) for name, site in sites.items()}
        for site, index in chosen:
            mask[site][index] = True
        circuit = Circuit.from_mask(model, mask, ablation=ablation, means=means, candidates=candidates,
                                    header={"task": {"name": task.name}})
        survivors = {(node.site, node.index) for node in circuit.kept_nodes()}
        if survivors == chosen:
            break
        chosen = survivors
    return circuit, {"kind": ablation, "means": means}


def declared_reference(loaded: LoadedModel, circuit: Circuit) -> tuple[dict, dict | None]:
    """Fills and frozen norm scales that reproduce a parsed circuit on its source model."""
    from circuitir.passes.ablate import declared_means

    recorded = circuit.header.get("source", {}).get("sha256")
    if recorded and loaded.sha256 and recorded != loaded.sha256:
        raise UserError(f"the circuit was extracted from another model (source.sha256 {recorded[:12]}..., "
                        f"{loaded.path} is {loaded.sha256[:12]}...); pass --model with its source")
    kind = circuit.header.get("ablation", {}).get("kind", "mean")
    means = declared_means(loaded, circuit.header) if kind == "mean" else None
    frozen = None
    if circuit.header.get("norm") == "frozen":
        # A norm with no kept read does not reach the logits, so its frozen scale is immaterial.
        frozen = {name: (circuit.norms[name].frozen_scale if name in circuit.norms else 1.0)
                  for name in loaded.model.norms()}
    return {"kind": kind, "means": means}, frozen


def time_calls(fn, tokens: torch.Tensor, calls: int) -> float:
    """Seconds per call, over ``calls`` back-to-back calls."""
    started = time.perf_counter()
    for _ in range(calls):
        fn(tokens)
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=f"checkpoint [default: {DEFAULT_MODEL.relative_to(ROOT)} if it exists, "
                                        "else a random small-preset model]")
    parser.add_argument("--circuit", help=".cir file to time [default: a random circuit of --nodes nodes]")
    parser.add_argument("--task", help="task whose prompts are the batch [default: the circuit's task, or brackets]")
    parser.add_argument("--nodes", type=int, default=40, help="kept nodes of the random circuit [default: 40]")
    parser.add_argument("--sites", help="comma-separated substrings: the random circuit picks nodes only at "
                                        "sites whose name contains one (e.g. mlp,final) [default: all sites]")
    parser.add_argument("--ablation", choices=("mean", "zero"), default="mean",
                        help="ablation of the random circuit [default: mean, over task prompts]")
    parser.add_argument("--prompts", type=int, default=256, help="batch size, in task prompts [default: 256]")
    parser.add_argument("--quick", action="store_true", help="few rounds: checks that it runs, not a figure")
    parser.add_argument("--rounds", type=int, help="interleaved rounds [default: 15, --quick: 3]")
    parser.add_argument("--min-time", type=float, help="seconds each measurement lasts at least "
                                                       "[default: 0.5, --quick: 0.1]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [default: 1]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 0.5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    try:
        loaded, model_name = load(args.model, args.seed)
        model = loaded.model
        model.eval()
        if args.circuit:
            from circuitir.grammar import parse
            circuit = parse(Path(args.circuit).read_text(), args.circuit)
            task = get_task(args.task or circuit.header.get("task", {}).get("name") or "brackets")
            reference, frozen = declared_reference(loaded, circuit)
            origin = args.circuit
        else:
            task = get_task(args.task or "brackets")
            sites_like = args.sites.split(",") if args.sites else None
            circuit, reference = random_circuit(loaded, task, args.nodes, args.ablation, args.seed, sites_like)
            frozen = None
            origin = (f"random mask over {'sites like ' + args.sites if args.sites else 'all sites'}, "
                      f"{args.ablation} ablation, grown until DCE keeps every node (asked for {args.nodes})")
        batch = encode_examples(task, task.examples("heldout", args.prompts, args.seed), loaded.tokenizer,
                                model.config.block_size)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    tokens = batch.tokens
    module = compile_circuit(circuit)

    config = model.config
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    print(f"model: {model_name}", flush=True)
    print(f"  {config.n_layer} layers, d_model {config.d_model}, d_mlp {config.d_mlp}, vocab {config.vocab_size}; "
          f"{model.num_params():,} parameters, {nonzero:,} nonzero", flush=True)
    print(f"circuit: {origin}", flush=True)
    print(f"  {circuit.n_nodes} kept nodes, {circuit.n_edges} edges, {len(circuit.const_nodes())} constants, "
          f"{len(circuit.tracked_channels())} tracked residual channels, {len(circuit.heads)} attention heads, "
          f"{len(circuit.candidates)} candidate logits", flush=True)
    print(f"batch: {len(batch)} {task.name} held-out prompts, padded to {tokens.shape[1]} tokens "
          f"({tokens.numel():,} tokens)", flush=True)

    # What is timed must be right: circuit logits == ablated model's candidate logits.
    calibration = circuit.header.get("calibration", {})
    scale, shift = float(calibration.get("scale", 1.0)), float(calibration.get("shift", 0.0))
    with torch.no_grad():
        fills = fills_for(model, reference["kind"], reference["means"])
        expected = ablate(model, circuit_mask(circuit, model), fills, frozen)(tokens)[..., circuit.candidates]
        got = (module(tokens) - shift) / scale  # the header's calibration undone: the circuit's own logits
    error = float((got - expected).abs().max())
    verdict = "ok" if error <= TOLERANCE else "FAILED"
    calibrated = f", calibration scale {scale:.4g} undone" if (scale, shift) != (1.0, 0.0) else ""
    print(f"check: max |circuit - ablated model| over all {got.numel():,} logits = {error:.2e} "
          f"({verdict}, tolerance {TOLERANCE:.0e}{calibrated})", flush=True)

    runs = {"model": model, "circuit": module}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        calls = {}
        for name, fn in runs.items():  # warm up, and size each measurement to last about min_time
            once = time_calls(fn, tokens, 1)
            calls[name] = max(1, round(min_time / max(once, 1e-6)))
        names = list(runs)
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                times[name].append(time_calls(runs[name], tokens, calls[name]))

    print(f"timing: {rounds} interleaved rounds, calls per measurement: "
          + ", ".join(f"{n} {calls[n]}" for n in names) + f"; {args.threads} thread(s)", flush=True)
    print(f"{'':8s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'tokens/s':>14s}")
    median = {}
    for name in names:
        median[name] = statistics.median(times[name])
        print(f"{name:8s} {1000 * median[name]:10.3f} {1000 * min(times[name]):9.3f} {1000 * max(times[name]):9.3f} "
              f"{tokens.numel() / median[name]:14,.0f}")
    print(f"ratio model/circuit time: {median['model'] / median['circuit']:.1f}x", flush=True)
    if verdict != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
