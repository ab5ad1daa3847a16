"""Devices and data-parallel training: --device/--dtype, and torchrun with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitir.errors import UserError
from circuitir.models.checkpoint import load_model
from circuitir.models.device import resolve_device, resolve_dtype

from conftest import cli

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12


def train_args(out, corpus, *extra):
    return ["train", "-o", str(out), "--preset", "tiny", "--steps", str(STEPS), "--batch-size", "8",
            "--corpus", str(corpus), "--quiet", "--device", "cpu", *extra]


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad, message in [("tpu", "use one of"), ("cpu:1", "use one of"), ("cuda:x", "use one of")]:
        with pytest.raises(UserError, match=message):
            resolve_device(bad)
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(UserError, match="--dtype float16"):
        resolve_dtype("float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    code, out, err = cli("eval", "models/sparse.pt", "--task", "quotes", "--device", "cuda")
    assert code == 2 and out == "" and "torch sees no CUDA GPU" in err and err.count("\n") == 1
    code, _, err = cli("train", "-o", tmp_path / "m.pt", "--preset", "tiny", "--device", "cuda")
    assert code == 2 and "torch sees no CUDA GPU" in err and not (tmp_path / "m.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_and_eval_on_cuda_match_cpu(tmp_path, tiny_corpus):
    for device in ("cpu", "cuda"):
        code, _, err = cli(*train_args(tmp_path / f"{device}.pt", tiny_corpus)[:-2], "--device", device)
        assert code == 0, err
    a, b = load_model(tmp_path / "cpu.pt"), load_model(tmp_path / "cuda.pt")
    assert b.meta["training"]["device"] == "cuda"
    # Different kernels round differently, and the top-k projection can then keep another weight at
    # a near tie: compare what training reached, and how much of the sparsity pattern is shared.
    assert a.meta["metrics"]["val_loss"] == pytest.approx(b.meta["metrics"]["val_loss"], abs=0.05)
    for (name, x), y in zip(a.model.sparse_parameters().items(), b.model.sparse_parameters().values()):
        assert float(((x != 0) == (y != 0)).float().mean()) > 0.95, name
    code, out, err = cli("eval", tmp_path / "cuda.pt", "--task", "quotes", "--device", "cuda", "--json", "-n", "64")
    assert code == 0, err


def test_bfloat16_training_runs_and_stays_close(tmp_path, tiny_corpus):
    code, _, err = cli(*train_args(tmp_path / "f32.pt", tiny_corpus))
    assert code == 0, err
    code, _, err = cli(*train_args(tmp_path / "bf16.pt", tiny_corpus, "--dtype", "bfloat16"))
    assert code == 0, err
    f32, bf16 = load_model(tmp_path / "f32.pt"), load_model(tmp_path / "bf16.pt")
    assert bf16.meta["training"]["dtype"] == "bfloat16"
    assert next(bf16.model.parameters()).dtype == torch.float32  # master weights stay float32
    assert abs(f32.meta["metrics"]["val_loss"] - bf16.meta["metrics"]["val_loss"]) < 0.1


def test_eval_on_a_named_device(tmp_path, tiny_corpus):
    code, _, err = cli(*train_args(tmp_path / "m.pt", tiny_corpus))
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "m.pt", "--task", "quotes", "--device", "cpu", "--json", "-n", "32")
    assert code == 0, err and json.loads(out)["n"] == 32


def torchrun(nproc: int, argv: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "circuitir.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_two_cpu_ranks_equal_one_process_with_the_same_global_batch(tmp_path, tiny_corpus):
    code, _, err = cli(*train_args(tmp_path / "one.pt", tiny_corpus))
    assert code == 0, err
    log = tmp_path / "two.log"
    result = torchrun(2, train_args(tmp_path / "two.pt", tiny_corpus, "--log-file", str(log), "--json"))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_model(tmp_path / "one.pt"), load_model(tmp_path / "two.pt")
    assert two.meta["training"]["world_size"] == 2 and one.meta["training"]["world_size"] == 1
    worst = max(float((x - y).abs().max()) for x, y in zip(one.model.state_dict().values(),
                                                           two.model.state_dict().values()))
    print(f"largest weight difference, 2 ranks vs 1 process: {worst:.2e}")
    assert worst < 1e-4, worst
    # The sparsity projection kept the same weights on both runs.
    for (name, x), y in zip(one.model.sparse_parameters().items(), two.model.sparse_parameters().values()):
        assert torch.equal(x != 0, y != 0), name
    assert one.meta["metrics"]["val_loss"] == pytest.approx(two.meta["metrics"]["val_loss"], abs=1e-4)
    # Written once: rank 0 alone logs, prints and saves; no temporary file is left behind.
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [STEPS]  # one record (the tiny preset evaluates every 20 steps)
    assert result.stdout.count('"val_loss"') == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".two")) == []


@pytest.mark.slow  # another torchrun start-up (about 9 s on 2 cores)
def test_a_global_batch_that_does_not_split_is_refused_on_every_rank(tmp_path, tiny_corpus):
    args = train_args(tmp_path / "x.pt", tiny_corpus)
    args[args.index("--batch-size") + 1] = "7"
    result = torchrun(2, args)
    assert result.returncode != 0
    assert result.stderr.count("does not split over 2 ranks") == 2
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow  # a long torchrun job killed half-way (about 20 s)
def test_a_rank_that_dies_leaves_no_checkpoint_behind(tmp_path, tiny_corpus):
    import signal
    import time

    args = train_args(tmp_path / "m.pt", tiny_corpus)
    args[args.index("--steps") + 1] = "100000"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "circuitir.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT)

    def rank_one() -> int | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"RANK=1" in environ and b"circuitir.cli" in cmdline and str(tmp_path).encode() in cmdline:
                return int(entry.name)
        return None

    deadline = time.time() + 120
    victim = None
    while victim is None and time.time() < deadline:
        time.sleep(1)
        victim = rank_one()
    assert victim is not None, "rank 1 never started"
    time.sleep(8)  # training under way (the tiny preset writes a checkpoint every 20 steps)
    os.kill(victim, signal.SIGKILL)
    _, stderr = job.communicate(timeout=180)
    assert job.returncode != 0
    # Whatever rank 0 had written is a whole checkpoint (a periodic one) or nothing; never a fragment.
    if (tmp_path / "m.pt").exists():
        assert 0 < load_model(tmp_path / "m.pt").meta["step"] < 100000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
