"""Extraction and check time: this tree against an earlier commit, side by side in one run.

    python benchmarks/extraction_speed.py [--baseline c9423ca] [--task brackets] [--rounds 1]

The earlier commit is checked out with ``git worktree`` into a temporary
directory; each round runs ``extract`` and then ``check`` (the shipped
circuit's claims, the random re-initialised control included) once in each
tree, alternating which goes first, each in a fresh process on one thread
with a shared, warm means cache. It prints each time, the ratios
(baseline / this tree) and whether both trees found the same nodes. The
machines are shared and noisy: only ratios measured in one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

JOB = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from circuitir.models.checkpoint import load_model
from circuitir.tasks import get_task
from circuitir.runtime.extract import extract
from circuitir.runtime.check import check
from circuitir.grammar import parse
loaded = load_model(sys.argv[1])
started = time.perf_counter()
circuit, summary = extract(loaded, get_task(sys.argv[2]), progress=False)
extract_s = time.perf_counter() - started
shipped = parse(open(sys.argv[3]).read())
started = time.perf_counter()
report = check(shipped, loaded, progress=False)
check_s = time.perf_counter() - started
print(json.dumps({"extract_s": extract_s, "check_s": check_s, "nodes": [str(n) for n in circuit.kept_nodes()],
                  "check_passed": report["passed"],
                  "necessary": report["minimality"]["necessary"]}))
"""


def run(tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", JOB, str(ROOT / args.model), args.task, str(tree / args.circuit)],
                         cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{tree}: failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="c9423ca", help="the earlier commit (default: before the graph rewrite)")
    parser.add_argument("--task", default="brackets")
    parser.add_argument("--model", default="models/sparse.pt")
    parser.add_argument("--circuit", default="examples/sparse-brackets.cir", help="the circuit check verifies (each tree checks its own copy)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="circuitir-baseline-") as temp:
        baseline = Path(temp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(baseline), args.baseline],
                       check=True)
        try:
            run(ROOT, args)  # warm the means cache and the file system for both
            times = {"baseline": [], "this": []}
            for round_ in range(args.rounds):
                order = [("baseline", baseline), ("this", ROOT)]
                for name, tree in (order if round_ % 2 == 0 else order[::-1]):
                    result = run(tree, args)
                    times[name].append(result)
                    print(f"round {round_ + 1} {name:8s}: extract {result['extract_s']:6.1f} s, "
                          f"check {result['check_s']:6.1f} s, {len(result['nodes'])} nodes, "
                          f"check passed {result['check_passed']}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    def total(name, key):
        return sum(r[key] for r in times[name])
    same = all(a["nodes"] == b["nodes"] for a, b in zip(times["baseline"], times["this"]))
    print(f"extract: baseline / this = {total('baseline', 'extract_s') / total('this', 'extract_s'):.2f}x")
    print(f"check:   baseline / this = {total('baseline', 'check_s') / total('this', 'check_s'):.2f}x")
    print(f"same nodes in both trees: {same}; nodes: baseline {len(times['baseline'][0]['nodes'])}, "
          f"this {len(times['this'][0]['nodes'])}")


if __name__ == "__main__":
    main()
