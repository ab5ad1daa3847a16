"""Extraction time with --jobs 1 and --jobs N, and extraction and eval time on every available device.

    python benchmarks/jobs_and_devices.py [--model models/sparse.pt] [--tasks a,b] [--jobs 2] [--quick]

(a) the same tasks extracted by ``circuitir.sweep.extract_many`` with one job and
with ``--jobs`` jobs, wall-clock each, and the speed-up; the files must be
byte-identical. (b) on each device torch can use here (cpu, and cuda / mps when
present): the first task extracted with the model on that device (what
``circuitir extract --device D`` does: masked graphs, recordings and
evaluations on the device, the circuit on the CPU), wall-clock and whether it
keeps the CPU circuit's nodes; and ``evaluate_model`` on 512 held-out prompts,
median of 3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUICK_PIPELINE = ("trace, mean-ablate{tokens=4096}, prune{target=%s,steps=30,prompts=32,select=32}, "
                  "lower, fold-constants, dce")


def main() -> None:
    import torch

    from circuitir.api import load_model as load_on
    from circuitir.errors import UserError
    from circuitir.models.checkpoint import load_model
    from circuitir.runtime.extract import extract
    from circuitir.sweep import extract_many
    from circuitir.tasks import get_task
    from circuitir.tasks.evaluate import evaluate_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/sparse.pt")
    parser.add_argument("--tasks", default="bracket_counting,single_double_quote")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a short pipeline (30 mask-search steps)")
    parser.add_argument("--target", type=float, default=0.15, help="target loss [0.15]")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    options = {"pipeline": QUICK_PIPELINE % args.target if args.quick else None, "target": args.target, "seed": 0}
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory() as root:
        times = {}
        for jobs in (1, args.jobs):
            started = time.time()
            rows = extract_many(args.model, tasks, Path(root) / f"jobs{jobs}", jobs=jobs, loaded=loaded, **options)
            times[jobs] = time.time() - started
            print(f"--jobs {jobs}: {len(rows)} tasks in {times[jobs]:.1f} s")
            for row in rows:
                print(f"    {row['task']}: " + (f"not extracted: {row['error']}" if "error" in row else
                                                f"{row['nodes']} nodes, loss {row['loss']:.4f}, {row['seconds']:.1f} s"))
        same = all((Path(root) / "jobs1" / f"{t}.cir").read_text() == (Path(root) / f"jobs{args.jobs}" / f"{t}.cir")
                   .read_text() for t in tasks if (Path(root) / "jobs1" / f"{t}.cir").exists())
        print(f"speed-up with {args.jobs} jobs: {times[1] / times[args.jobs]:.2f}x; files byte-identical: {same}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    task = get_task(tasks[0])
    cpu_nodes = None
    for device in devices:
        on_device = load_on(args.model, device=device)
        started = time.time()
        try:
            circuit, _ = extract(on_device, task, progress=False, **options)
        except UserError as exc:
            print(f"extract {task.name} on {device}: not extracted: {exc}")
            continue
        nodes = circuit.kept_nodes()
        cpu_nodes = nodes if cpu_nodes is None else cpu_nodes
        print(f"extract {task.name} on {device}: {time.time() - started:.1f} s, {circuit.n_nodes} nodes"
              + ("" if device == "cpu" else f", the CPU circuit's nodes: {nodes == cpu_nodes}"))
    for device in devices:
        loaded.model.to(device)
        runs = []
        for _ in range(3):
            started = time.time()
            evaluate_model(loaded.model, task, loaded.tokenizer, "heldout", 512)
            runs.append(time.time() - started)
        print(f"eval {task.name} (512 prompts) on {device}: {statistics.median(runs) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
