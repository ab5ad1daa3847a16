"""Circuit size against target loss, sparse beside dense: the paper's curve (issue 11, points 2 and 3).

For each model and task, ``extract_frontier`` (``circuitir extract --targets``) gives one circuit per
target loss in one run. The script prints, per target, each model's edges (geometric mean over the
tasks every model meets at that target) and the ratio dense / sparse, and draws the curves.

The paper compares a sparse and a dense model of *equal pretraining loss*. Give the dense models to
compare with ``--dense`` (e.g. ``models/dense.pt`` and ``models/dense-matched.pt``, a snapshot of a
shorter dense run whose validation loss matches the sparse model's: ``circuitir train --dense
--keep-every N``); the script prints each model's validation loss from its checkpoint so the match can be
read off, and the ratio of each dense model to the sparse one over the tasks that pair meets.

Circuits are kept in ``--out DIR/<model>/<task>-t<target>.cir`` and reused on a later run (an
extraction takes minutes on one core), so the script can be stopped and resumed::

    python benchmarks/frontier.py [--sparse models/sparse.pt] [--dense models/dense.pt,...]
        [--tasks bracket_counting,...] [--targets 0.1,0.15,0.2,0.3,0.4] [--out DIR] [--plot F.png] [--json OUT]
        [--cached-only]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuitir.grammar import emit, parse  # noqa: E402
from circuitir.models.checkpoint import atomic_write_text, file_sha256, load_model  # noqa: E402
from circuitir.runtime.extract import extract_frontier  # noqa: E402
from circuitir.tasks import get_task  # noqa: E402


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def frontier_sizes(model_path: str, task: str, targets: list[float], out: Path, progress: bool,
                   extract: bool = True) -> dict:
    """{target: {"nodes", "edges", "loss"}} for the targets the model meets, extracting only what the
    cache lacks (nothing with ``extract=False``: a target not in the cache is left out)."""
    folder = out / Path(model_path).stem
    cached = {t: folder / f"{task}-t{t:g}.cir" for t in targets}
    missing = [t for t, path in cached.items() if not path.exists() and not path.with_suffix(".unmet").exists()]
    if missing and extract:
        rows = extract_frontier(load_model(model_path), get_task(task), missing, progress=progress)
        for row in rows:
            path = cached[row["target"]]
            if "error" in row:
                atomic_write_text(path.with_suffix(".unmet"), row["error"] + "\n")
            else:
                atomic_write_text(path, emit(row["circuit"]))
    sizes = {}
    model_sha = None
    for target, path in cached.items():
        if path.exists():
            circuit = parse(path.read_text(), str(path))
            model_sha = model_sha or file_sha256(model_path)
            if circuit.provenance.model_sha256 != model_sha:
                raise SystemExit(f"{path} was extracted from another model than {model_path} (the cache is keyed "
                                 f"by file name); give --out another folder or delete {folder}")
            sizes[target] = {"nodes": circuit.n_nodes, "edges": circuit.n_edges, "loss": circuit.claims.loss}
    return sizes


def validation_loss(model_path: str) -> float | None:
    meta = load_model(model_path).meta
    return (meta.get("metrics") or {}).get("val_loss")


def summarise(sizes: dict, models: list[str], tasks: list[str], targets: list[float]) -> list[dict]:
    """Per target: each model's geometric-mean edges and nodes over the tasks every model meets."""
    rows = []
    for target in targets:
        shared = [task for task in tasks if all(target in sizes[m][task] for m in models)]
        row = {"target": target, "tasks": shared}
        for model in models:
            if shared:
                row[model] = {key: geometric_mean([sizes[model][task][target][key] for task in shared])
                              for key in ("nodes", "edges")}
        if shared:
            sparse = models[0]
            row["ratios"] = {m: row[m]["edges"] / row[sparse]["edges"] for m in models[1:]}
        rows.append(row)
    return rows


def pairwise(sizes: dict, sparse: str, dense: str, tasks: list[str], targets: list[float]) -> list[dict]:
    """Per target: the ratio dense / sparse of geometric-mean edges over the tasks *these two* models meet
    (the paper's comparison is one pair at a time; the summary above needs every model to meet a task)."""
    rows = summarise({m: sizes[m] for m in (sparse, dense)}, [sparse, dense], tasks, targets)
    return [{"target": row["target"], "tasks": row["tasks"], "sparse_edges": row[sparse]["edges"],
             "dense_edges": row[dense]["edges"], "ratio": row["ratios"][dense]} for row in rows if "ratios" in row]


def plot(rows: list[dict], models: list[str], path: str) -> None:
    from circuitir.render.plots import save_figure, subplots

    fig, ax = subplots(figsize=(5.5, 3.6), dpi=150)
    for model, marker in zip(models, "osd^v"):
        points = [(row["target"], row[model]["edges"]) for row in rows if model in row]
        ax.plot(*zip(*points), marker=marker, label=Path(model).stem)
    ax.set_yscale("log")
    shown = [row for row in rows if "ratios" in row]
    ax.set_xticks([row["target"] for row in shown],
                  [f"{row['target']:g}\n{len(row['tasks'])} task{'s' * (len(row['tasks']) > 1)}" for row in shown],
                  fontsize=7)
    ax.set_xlabel("target task loss (nats); tasks every model meets")
    ax.set_ylabel("circuit edges (geometric mean over tasks)")
    ax.set_title("circuit size against target loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparse", default="models/sparse.pt")
    parser.add_argument("--dense", default="models/dense.pt", help="dense models, comma-separated")
    parser.add_argument("--tasks", default="bracket_counting")
    parser.add_argument("--targets", default="0.1,0.15,0.2,0.3,0.4")
    parser.add_argument("--out", default="benchmarks/frontier", help="where circuits are kept and reused")
    parser.add_argument("--plot", help="draw the curves here (.png)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cached-only", action="store_true",
                        help="extract nothing: summarise the circuits already in --out (a missing one counts "
                             "as not met)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [args.sparse] + [m for m in args.dense.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    targets = sorted(float(t) for t in args.targets.split(","))
    out = Path(args.out)
    sizes = {m: {task: frontier_sizes(m, task, targets, out, progress=sys.stderr.isatty(),
                                          extract=not args.cached_only) for task in tasks}
             for m in models}
    for model in models:
        loss = validation_loss(model)
        print(f"{Path(model).stem}: validation loss {loss:.3f} nats/byte" if loss is not None else
              f"{Path(model).stem}: validation loss not recorded")
    rows = summarise(sizes, models, tasks, targets)
    names = [Path(m).stem for m in models]
    print(f"{'target':>6s} {'tasks':>5s} " + " ".join(f"{n + ' edges':>14s}" for n in names)
          + " " + " ".join(f"{n + '/' + names[0]:>16s}" for n in names[1:]))
    for row in rows:
        if "ratios" not in row:
            print(f"{row['target']:6g} {0:5d}  no task met by every model")
            continue
        print(f"{row['target']:6g} {len(row['tasks']):5d} " + " ".join(f"{row[m]['edges']:14.1f}" for m in models)
              + " " + " ".join(f"{row['ratios'][m]:16.2f}" for m in models[1:]))
    pairs = {}
    for dense in models[1:]:
        pairs[dense] = pairwise(sizes, models[0], dense, tasks, targets)
        print(f"{Path(dense).stem} against {names[0]}, over the tasks both meet:")
        for row in pairs[dense]:
            print(f"  {row['target']:6g}  {len(row['tasks'])} tasks  edges {row['sparse_edges']:8.1f} vs "
                  f"{row['dense_edges']:8.1f}  ratio {row['ratio']:6.2f}  ({', '.join(row['tasks'])})")
    if args.plot:
        plot(rows, models, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"sizes": {m: {t: {str(k): v for k, v in s.items()}
                                                               for t, s in per.items()} for m, per in sizes.items()},
                                                 "rows": rows, "pairwise": pairs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
