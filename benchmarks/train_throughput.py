"""Training throughput: a weight-sparse step against a dense step of the same shape.

A step is what ``circuitir train`` does per batch (``circuitir.models.train.train_step``):
forward, backward, gradient RMS normalisation, AdamW, and for the sparse
variants the top-k projection of every matrix. Three variants at the ``small``
preset's shape (2 layers, d_model 128, d_mlp 512, context 128, batch 32):

* ``dense``          — the dense baseline (no projection);
* ``sparse``         — weight sparsity at the preset's target densities;
* ``sparse+abstopk`` — the same, with AbsTopK activation sparsity (afrac 1/4 at
                       attn_in, attn_out, mlp_in, mlp_out) on as well.

The variants are measured interleaved, in rotating order, in one process, so
that machine load drifts hit all of them alike; the figure of merit is the
ratio of median step times, sparse / dense (target: at most 1.3).

    python benchmarks/train_throughput.py            # about a minute on one core
    python benchmarks/train_throughput.py --quick    # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT
from circuitir.models.train import PRESETS, Recipe, make_optimizer, sparsify, train_step

TARGET_RATIO = 1.3


class Variant:
    def __init__(self, name: str, recipe: Recipe, seed: int = 0):
        self.name = name
        self.recipe = recipe
        config = GPTConfig.from_dict({"vocab_size": 256, **recipe.model})
        self.model = SparseGPT(config)
        self.model.reset_parameters(torch.Generator().manual_seed(seed))
        self.optimizer = make_optimizer(self.model, recipe)
        # Time steps after annealing, where the run spends most of its time: matrices at target
        # density, learning rate nonzero.
        self.step = recipe.steps * 3 // 4
        if not recipe.dense:
            sparsify(self.model, recipe, recipe.density)
        self.model.train()
        self.times: list[float] = []

    def run(self, inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            train_step(self.model, self.optimizer, self.recipe, self.step, inputs, targets)
        return (time.perf_counter() - started) / steps


def variants() -> list[Variant]:
    base = PRESETS["small"]
    dense = Recipe(**{**base.to_dict(), "dense": True, "density": 1.0, "embed_density": 1.0})
    sparse = Recipe(**base.to_dict())
    abstopk = Recipe(**{**base.to_dict(), "model": {**base.model, "afrac": 0.25}})
    return [Variant("dense", dense), Variant("sparse", sparse), Variant("sparse+abstopk", abstopk)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: checks that it runs, not a figure")
    parser.add_argument("--rounds", type=int, help="interleaved rounds [default: 6, --quick: 2]")
    parser.add_argument("--steps", type=int, help="steps per variant per round [default: 3, --quick: 1]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [default: 1]")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    steps = args.steps or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    runs = variants()
    recipe = runs[0].recipe
    block = runs[0].model.config.block_size
    tokens = torch.randint(0, 256, (recipe.batch_size, block + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    for variant in runs:  # warm up allocator and kernels
        variant.run(inputs, targets, 1)
    for r in range(rounds):
        for i in range(len(runs)):
            variant = runs[(r + i) % len(runs)]
            variant.times.append(variant.run(inputs, targets, steps))

    tokens_per_step = inputs.numel()
    print(f"train step, small preset shape: batch {recipe.batch_size} x context {block}, "
          f"{runs[0].model.config.n_layer} layers, d_model {runs[0].model.config.d_model}; "
          f"{rounds} rounds x {steps} steps, {args.threads} thread(s)")
    print(f"{'variant':16s} {'step ms':>9s} {'tokens/s':>10s}")
    median = {}
    for variant in runs:
        median[variant.name] = statistics.median(variant.times)
        print(f"{variant.name:16s} {1000 * median[variant.name]:9.1f} {tokens_per_step / median[variant.name]:10,.0f}")
    for name in ("sparse", "sparse+abstopk"):
        ratio = median[name] / median["dense"]
        verdict = "within" if ratio <= TARGET_RATIO else "OVER"
        print(f"ratio {name}/dense step time: {ratio:.3f} ({verdict} target {TARGET_RATIO})")


if __name__ == "__main__":
    main()
