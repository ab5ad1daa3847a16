"""Seed stability: the same extraction under K seeds; how alike are the circuits?

The paper's circuits are one draw from an equivalence class: another seed of
the mask search may keep other nodes that do the same job. This script runs
``cir.extract`` (the default pipeline unless ``--pipeline``) for one model and
one task under seeds 0..K-1 and reports

* per seed: nodes, edges, held-out loss and accuracy (``header["metrics"]``:
  the same 256 held-out prompts for every seed), whether the target is met
  there, the nodes bisection alone kept (before the greedy step), and the
  extraction's seconds;
* the spread of sizes: mean, standard deviation (n - 1), min, max, and
  max / min;
* the overlap of the node sets: Jaccard |A ∩ B| / |A ∪ B| for every pair of
  seeds (mean, min, max), the nodes common to every seed (by site) and the
  union, and how many nodes appear in exactly k of the K circuits; the same
  for the edge sets; and, for scale, the Jaccard two random node sets of the
  mean size would have (drawn from all the model's nodes, every channel of
  every site).

``--seed`` is ``circuitir extract --seed``: it seeds everything random in
the extraction, not the mask's initial values alone: the corpus windows the
ablation means are taken over, the train-split prompts the mask is learned on
and the ones bisection and the greedy step select on, and the mask's
initial noise. Each seed's circuit is written to ``--out-dir`` as
``seed<S>.cir`` (with ``seed<S>.json``: the seconds it took); a seed whose file
is already there is read, not extracted again (its header must name the same
model, task and seed), so an interrupted run resumes where it stopped.

    python benchmarks/seed_stability.py [--seeds 5] [--model M.pt] [--task T] [--target 0.15]
                                        [--out-dir DIR] [--json OUT] [--plot PNG] [--quick]

One extraction takes 2 to 5 minutes on one core, so the default five take
10 to 25. ``--quick`` is the smoke run: a short pipeline (4096 mean tokens, 60
mask steps, 64 + 48 prompts), three seeds, no figure. Figures measured on the
shipped model are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import circuitir as cir  # noqa: E402
from circuitir.errors import UserError  # noqa: E402
from circuitir.render.plots import write_results  # noqa: E402
from circuitir.models.checkpoint import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK_PIPELINE = "trace, mean-ablate{tokens=4096}, prune{steps=60,prompts=64,select=48}, lower, fold-constants, dce"


# ---------------------------------------------------------------- overlap of node sets

def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def overlap(sets: dict) -> dict:
    """Pairwise Jaccard of ``{seed: set}`` (every pair, its mean, min, max), the elements common to all
    and their union, and ``frequency[k]``: how many elements appear in exactly k of the sets."""
    pairs = {f"{a}-{b}": jaccard(sets[a], sets[b]) for a, b in itertools.combinations(sorted(sets), 2)}
    values = list(pairs.values())
    common = set.intersection(*sets.values()) if sets else set()
    union = set.union(*sets.values()) if sets else set()
    counts = {element: sum(element in s for s in sets.values()) for element in union}
    return {"pairs": pairs,
            "mean": statistics.fmean(values) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None,
            "common": sorted(common), "union": len(union),
            "frequency": {k: sum(1 for c in counts.values() if c == k) for k in range(1, len(sets) + 1)}}


def chance_jaccard(a: float, b: float, n: int) -> float:
    """Jaccard of two node sets of sizes ``a`` and ``b`` drawn at random from ``n`` nodes, to first order:
    E|A ∩ B| = ab/n, so J = (ab/n) / (a + b - ab/n)."""
    both = a * b / n
    return both / (a + b - both)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values),
            "max_over_min": max(values) / min(values) if min(values) > 0 else float("inf")}


# ---------------------------------------------------------------- extracting, resumably

def parse_seeds(text: str) -> list[int]:
    """``5`` -> seeds 0..4; ``0,3,7`` -> those seeds."""
    try:
        seeds = [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        raise UserError(f"--seeds takes a count (5) or a list (0,3,7), not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {text!r}: give at least one seed, each once, none negative")
    return seeds


def wanted_pipeline(pipeline: str | None, target: float | None) -> str:
    """The pipeline text ``extract`` records in a header for these options."""
    from circuitir.passes import pipeline_text
    from circuitir.runtime.extract import build_pipeline
    return pipeline_text(build_pipeline(pipeline, target, None), explicit=True)


def extract_seed(loaded, task, seed: int, out_dir: Path, *, target=None, pipeline=None, progress=False) -> dict:
    """The circuit of one seed, read from ``out_dir/seed<S>.cir`` when a run before wrote it (its header must
    name the same model, task, seed and pipeline), else extracted and written there (atomically).
    Returns {"circuit", "seconds", "cached"}."""
    path, side = out_dir / f"seed{seed}.cir", out_dir / f"seed{seed}.json"
    if path.exists():
        circuit = cir.load(path)
        made = circuit.provenance
        found = {"model": made.model_sha256, "task": made.task, "seed": made.seed, "pipeline": made.pipeline}
        wanted = {"model": loaded.sha256, "task": task.name, "seed": seed,
                  "pipeline": wanted_pipeline(pipeline, target)}
        if found != wanted:
            differ = ", ".join(f"{k} {found[k]!r} (wanted {wanted[k]!r})" for k in found if found[k] != wanted[k])
            raise UserError(f"{path} was extracted with another {differ}; give another --out-dir or remove it")
        seconds = json.loads(side.read_text())["seconds"] if side.exists() else None
        return {"circuit": circuit, "seconds": seconds, "cached": True}
    started = time.perf_counter()
    circuit = cir.extract(loaded, task, target_loss=target, pipeline=pipeline, seed=seed, progress=progress)
    seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    circuit.save(path)
    atomic_write_text(side, json.dumps({"seconds": seconds}) + "\n")
    return {"circuit": circuit, "seconds": seconds, "cached": False}


def kept_edges(circuit) -> set:
    """The edges ``n_edges`` counts (weights and residual edges out of kept nodes), as (source, target) names."""
    return {(str(src), str(dst)) for src, dst, data in circuit.graph().edges(data=True)
            if data["kind"] in ("weight", "residual") and circuit.nodes[src].kind == "kept"}


def run(loaded, task, seeds: list[int], out_dir: Path, *, target=None, pipeline=None, progress=False,
        log=print) -> dict:
    """Every seed's circuit (extracted or read back), its figures, and the overlap of the node and edge sets."""
    task = cir.get_task(task)
    per_seed, nodes, edges = {}, {}, {}
    for seed in seeds:
        got = extract_seed(loaded, task, seed, out_dir, target=target, pipeline=pipeline, progress=progress)
        circuit = got["circuit"]
        claims = circuit.claims
        nodes[seed] = {str(node) for node in circuit.kept_nodes()}
        edges[seed] = kept_edges(circuit)
        assert len(nodes[seed]) == circuit.n_nodes and len(edges[seed]) == circuit.n_edges
        per_seed[seed] = {"nodes": circuit.n_nodes, "edges": circuit.n_edges, "loss": claims.loss,
                          "accuracy": circuit.header.get("metrics", {}).get("accuracy"),
                          "bisect_nodes": circuit.header.get("metrics", {}).get("bisect_nodes"),
                          "target": claims.target_loss, "met": claims.loss <= claims.target_loss,
                          "seconds": got["seconds"], "cached": got["cached"],
                          "file": str(out_dir / f"seed{seed}.cir")}
        row = per_seed[seed]
        log(f"seed {seed}: {row['nodes']} nodes, {row['edges']} edges, held-out loss {row['loss']:.4f}"
            + (" (read back)" if got["cached"] else f" ({row['seconds']:.0f} s)"))
    node_overlap, edge_overlap = overlap(nodes), overlap(edges)
    common_by_site = {}
    for name in node_overlap["common"]:
        site = name.rsplit("[", 1)[0]
        common_by_site[site] = common_by_site.get(site, 0) + 1
    from circuitir.ir.trace import trace
    all_nodes = sum(site.width for site in trace(loaded.model).sites.values())
    size = statistics.fmean(len(s) for s in nodes.values())
    node_overlap["chance"] = {"model_nodes": all_nodes, "jaccard": chance_jaccard(size, size, all_nodes)}
    return {"model": str(loaded.path), "model_sha256": loaded.sha256, "task": task.name, "seeds": seeds,
            "pipeline": circuit.provenance.pipeline, "per_seed": per_seed,
            "spread": {key: spread([per_seed[s][key] for s in seeds]) for key in ("nodes", "edges", "loss")},
            "nodes": {**node_overlap, "common_by_site": common_by_site},
            "edges": {**edge_overlap, "common": len(edge_overlap["common"])}}


# ---------------------------------------------------------------- printing and plotting

def print_report(out: dict) -> None:
    seeds = out["seeds"]
    print(f"{out['task']} on {out['model']} ({out['model_sha256'][:12]}), {len(seeds)} seeds")
    print(f"pipeline: {out['pipeline']}")
    print(f"{'seed':>5} {'nodes':>6} {'edges':>6} {'loss':>7} {'acc':>6} {'met':>4} {'bisect':>7} {'sec':>6}")
    for seed in seeds:
        r = out["per_seed"][seed]
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"{seed:>5} {r['nodes']:>6} {r['edges']:>6} {r['loss']:>7.4f} {r['accuracy']:>6.3f} "
              f"{'yes' if r['met'] else 'NO':>4} {str(r['bisect_nodes'] or '-'):>7} {seconds:>6}")
    print("(loss, acc: held-out, 256 prompts; met: held-out loss <= target; bisect: nodes after bisection alone, "
          "before the greedy step)")
    for key in ("nodes", "edges", "loss"):
        s = out["spread"][key]
        digits = 4 if key == "loss" else 1
        print(f"{key:>6}: mean {s['mean']:.{digits}f}, sd {s['sd']:.{digits}f}, min {s['min']:.{digits}f}, "
              f"max {s['max']:.{digits}f}, max/min {s['max_over_min']:.2f}")
    for kind in ("nodes", "edges"):
        o = out[kind]
        if o["mean"] is None:
            print(f"{kind}: one seed, no pairs to compare")
            continue
        common = len(o["common"]) if isinstance(o["common"], list) else o["common"]
        print(f"Jaccard of the {kind[:-1]} sets over {len(o['pairs'])} pairs: mean {o['mean']:.3f}, min {o['min']:.3f}, "
              f"max {o['max']:.3f}; common to all seeds {common}, union {o['union']}; in exactly k of "
              f"{len(seeds)} circuits: " + ", ".join(f"{k}: {n}" for k, n in o["frequency"].items()))
    chance = out["nodes"]["chance"]
    print(f"(two random sets of {out['spread']['nodes']['mean']:.0f} of the model's {chance['model_nodes']} nodes: "
          f"Jaccard {chance['jaccard']:.3f})")
    if out["nodes"]["common"]:
        print("nodes common to every seed, by site: "
              + ", ".join(f"{site} {n}" for site, n in out["nodes"]["common_by_site"].items()))


def plot(out: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = out["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    x = np.arange(len(seeds))
    ax.bar(x - 0.2, [out["per_seed"][s]["nodes"] for s in seeds], 0.4, label="nodes")
    ax.bar(x + 0.2, [out["per_seed"][s]["edges"] for s in seeds], 0.4, label="edges")
    for i, s in enumerate(seeds):
        ax.text(i, out["per_seed"][s]["edges"], f"{out['per_seed'][s]['loss']:.3f}", ha="center", va="bottom",
                fontsize=7)
    ax.set_xticks(x, [str(s) for s in seeds])
    ax.set_ylim(0, 1.3 * max(out["per_seed"][s]["edges"] for s in seeds))
    ax.set_xlabel("seed (label: held-out loss)")
    ax.set_title("circuit size per seed", fontsize=9)
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    ax = axes[1]
    matrix = np.ones((len(seeds), len(seeds)))
    for key, value in out["nodes"]["pairs"].items():
        a, b = (seeds.index(int(v)) for v in key.split("-"))
        matrix[a, b] = matrix[b, a] = value
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for a in range(len(seeds)):
        for b in range(len(seeds)):
            ax.text(b, a, f"{matrix[a, b]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[a, b] < 0.6 else "black")
    ax.set_xticks(range(len(seeds)), [str(s) for s in seeds])
    ax.set_yticks(range(len(seeds)), [str(s) for s in seeds])
    ax.set_title(f"Jaccard of node sets (mean {out['nodes']['mean']:.2f})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax = axes[2]
    frequency = out["nodes"]["frequency"]
    ax.bar([int(k) for k in frequency], list(frequency.values()))
    ax.set_xlabel(f"number of the {len(seeds)} seeds' circuits a node is in")
    ax.set_ylabel("nodes")
    ax.set_title(f"{len(out['nodes']['common'])} nodes in every circuit, {out['nodes']['union']} in any", fontsize=9)
    fig.suptitle(f"Seed stability: {out['task']} on {Path(out['model']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "sparse.pt"))
    parser.add_argument("--task", default="bracket_counting")
    parser.add_argument("--seeds", default=None, help="a count K (seeds 0..K-1; default 5, 3 with --quick) or a "
                        "list 0,3,7")
    parser.add_argument("--target", type=float, help="target loss (default: the pipeline's, 0.15)")
    parser.add_argument("--pipeline", help="the pass pipeline (default: extract's; --quick: a short one)")
    parser.add_argument("--out-dir", help="where each seed's .cir goes, and is read back from on a rerun "
                        "(default runs/seed_stability/<model>-<task>[-quick])")
    parser.add_argument("--quick", action="store_true", help="a short pipeline and three seeds: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="progress bars while extracting")
    parser.add_argument("--plot", help="write the figure here ('' for none; default benchmarks/seed_stability.png, "
                        "none with --quick)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick and args.pipeline is None:
        args.pipeline = QUICK_PIPELINE
    if args.plot is None:
        args.plot = "" if args.quick else str(ROOT / "benchmarks" / "seed_stability.png")
    try:
        seeds = parse_seeds(args.seeds or ("3" if args.quick else "5"))
        loaded = cir.load_model(args.model)
        task = cir.get_task(args.task)
        out_dir = Path(args.out_dir or ROOT / "runs" / "seed_stability" /
                       f"{Path(args.model).stem}-{task.name}{'-quick' if args.quick else ''}")
        started = time.perf_counter()
        out = run(loaded, task, seeds, out_dir, target=args.target, pipeline=args.pipeline, progress=args.progress)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out["seconds"] = time.perf_counter() - started
    out["out_dir"] = str(out_dir)
    print()
    print_report(out)
    print(f"({out['seconds']:.0f} s; circuits in {out_dir})")
    write_results(out, plot, args.plot, args.json, json_default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
