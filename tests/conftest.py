"""Shared fixtures: one CPU thread, tiny models, a tiny corpus.

The machine that runs the suite may have two cores busy with training, so every
model here is a few thousand parameters and every training run a few steps.
"""

from __future__ import annotations

import pytest
import torch

from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT

torch.set_num_threads(1)


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(block_size=16, vocab_size=256, n_layer=2, n_head=2, d_head=4, d_model=8, d_mlp=16)
    fields.update(overrides)
    return GPTConfig(**fields)


def randomize_(model: SparseGPT, seed: int = 0, scale: float = 0.5) -> SparseGPT:
    """Fill every parameter and buffer (wpe, biases, norm gains, sink, bigram, final bias) with noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


@pytest.fixture
def make_model():
    """``make_model(seed=..., **config fields)`` -> a SparseGPT with every weight random."""
    def make(seed: int = 0, **overrides) -> SparseGPT:
        return randomize_(SparseGPT(tiny_config(**overrides)), seed).eval()
    return make


@pytest.fixture
def random_tokens():
    def make(batch: int = 3, length: int = 16, vocab: int = 256, seed: int = 0) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return make


def write_corpus(root, n_files: int = 4) -> None:
    """A few small, varied Python files: enough for the tiny preset's 129-token windows."""
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = [f"import os\n\n\nclass Thing{f}:\n    def __init__(self, value):\n        self.value = value\n"]
        for i in range(12):
            lines.append(f"\n\ndef func_{f}_{i}(x, y={i}):\n    if x > {i * f}:\n        return [x, y, '{i}']\n"
                         f"    while x < {i + 3}:\n        x += 1\n    return {{'key': x, \"other\": {f}}}\n")
        (root / f"module_{f}.py").write_text("".join(lines))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="session", autouse=True)
def means_cache(tmp_path_factory):
    """Ablation means are cached under CIRCUITIR_CACHE: a temporary directory, never ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("circuitir-cache")
        patch.setenv("CIRCUITIR_CACHE", str(path))
        yield path


# A tiny recipe that learns bracket_brace in about 6 s on one core: only task text (task_mix 1), a
# 64-token context (less of the previous snippets' brackets in view: the model has no positions),
# an attention sink, a high learning rate. Held-out loss about 0.06 with seed 1; the task is learnt
# with seeds 0 and 2 too (about 0.3), which the fixture falls back on should this machine differ.
BRACKET_SEEDS = (1, 0, 2)
BRACKET_LEARNT = 0.35  # held-out loss that counts as learnt (chance is ln 2 = 0.69)


def bracket_recipe(corpus, seed: int):
    from circuitir.models.train import PRESETS, Recipe
    recipe = Recipe(**PRESETS["tiny"].to_dict())
    recipe.model.update(block_size=64, sink=True)
    recipe.steps, recipe.batch_size, recipe.lr, recipe.task_mix, recipe.seed = 400, 16, 0.1, 1.0, seed
    recipe.eval_every = recipe.checkpoint_every = recipe.steps
    recipe.corpus = str(corpus)
    return recipe


@pytest.fixture(scope="session")
def bracket_model(tmp_path_factory, tiny_corpus):
    """(checkpoint path, training metrics) of a tiny model trained once per session to do bracket_brace."""
    from circuitir.models import train as training
    from circuitir.tasks import get_task
    from circuitir.tasks.evaluate import evaluate_model

    def bracket_only(model, tokenizer, n=512):
        # train() ends by evaluating every task, and some tasks' prompts (up to 79 bytes) do not fit
        # this 64-token context: evaluate_model refuses them, and the run would end without its
        # checkpoint. Only the task this model is for is measured here.
        return {"bracket_brace": evaluate_model(model, get_task("bracket_brace"), tokenizer, "heldout", n)}

    root = tmp_path_factory.mktemp("bracket-model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "evaluate_tasks", bracket_only)
        for seed in BRACKET_SEEDS:
            path = root / f"seed{seed}.pt"
            metrics = training.train(bracket_recipe(tiny_corpus, seed), str(path), progress=False)
            if metrics["tasks"]["bracket_brace"]["loss"] < BRACKET_LEARNT:
                return path, metrics
    pytest.fail(f"the tiny recipe did not learn bracket_brace with seeds {BRACKET_SEEDS} on this machine "
                f"(last held-out loss {metrics['tasks']['bracket_brace']['loss']:.3f})")


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*argv) -> tuple[int, str, str]:
    """Run ``circuitir ARGV`` in this process: (exit code, stdout, stderr). Usable in any fixture scope."""
    import contextlib
    import io

    from circuitir.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def refused_on_cuda(commands: dict) -> None:
    """Each command (name -> argv) with ``--device cuda`` on a machine without a GPU: one line, exit 2."""
    for name, argv in commands.items():
        code, stdout, err = cli(*argv, "--device", "cuda")
        assert code == 2 and stdout == "" and err.count("\n") == 1, (name, err)
        assert "torch sees no CUDA GPU" in err and "Traceback" not in err


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts: SIGINT back to its default, so Python installs
    KeyboardInterrupt. A shell running the tests in the background (``pytest &``) starts them with SIGINT
    ignored, and the child would inherit that and never see the test's Ctrl-C."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_cpu_seconds(proc, seconds: float, timeout: float = 120) -> None:
    """Wait until child ``proc`` has used ``seconds`` of CPU time (Linux ``/proc``): past its imports and into
    its work however loaded the machine is, where a wall-clock sleep can signal a child still importing."""
    import os
    import time
    ticks = os.sysconf("SC_CLK_TCK")
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        with open(f"/proc/{proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks >= seconds:  # utime + stime
            return
        time.sleep(0.1)
    raise AssertionError(f"the child did not use {seconds} s of CPU within {timeout} s (exit code {proc.poll()})")
