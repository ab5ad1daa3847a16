"""Weight-sparse training: determinism, exact resume, safe checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

from circuitir.errors import UserError
from circuitir.models.checkpoint import load_model
from circuitir.models.sparsity import nonzeros_for
from circuitir.models.train import PRESETS, Recipe, train

from conftest import write_corpus

STEPS = 6


class Interrupted(Exception):
    """Stands in for the process dying in the middle of a run."""


def tiny_recipe(corpus, **overrides) -> Recipe:
    recipe = Recipe(**PRESETS["tiny"].to_dict())
    recipe.steps, recipe.checkpoint_every, recipe.eval_every = STEPS, 3, 1
    recipe.corpus = str(corpus)
    for name, value in overrides.items():
        setattr(recipe, name, value)
    return recipe


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def leftover_parts(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".part")]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_corpus):
    """One uninterrupted run, shared by the tests below: (checkpoint path, metrics, log records)."""
    out = tmp_path_factory.mktemp("baseline") / "run.pt"
    records = []
    metrics = train(tiny_recipe(tiny_corpus), str(out), progress=False, log=records.append)
    return out, metrics, records


def test_same_seed_gives_bit_identical_weights(tmp_path, tiny_corpus, baseline):
    out, metrics, records = baseline
    again = tmp_path / "again.pt"
    metrics_again = train(tiny_recipe(tiny_corpus), str(again), progress=False)
    assert_same_weights(weights(out), weights(again))
    assert metrics_again["val_loss"] == metrics["val_loss"]
    assert metrics_again["tasks"] == metrics["tasks"]


def test_different_seed_gives_different_weights(tmp_path, tiny_corpus, baseline):
    out, _, _ = baseline
    other = tmp_path / "other.pt"
    train(tiny_recipe(tiny_corpus, seed=1), str(other), progress=False)
    a, b = weights(out), weights(other)
    differing = [key for key in a if not torch.equal(a[key], b[key])]
    assert "transformer.wte.weight" in differing and "lm_head.weight" in differing


def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_corpus, baseline):
    out, _, records = baseline
    path = tmp_path / "run.pt"

    def die_after_step_3_checkpoint(record):
        if record["step"] == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_recipe(tiny_corpus), str(path), progress=False, log=die_after_step_3_checkpoint)
    assert leftover_parts(tmp_path) == []
    intermediate = torch.load(path, map_location="cpu", weights_only=True)
    assert intermediate["step"] == 3
    assert [r["step"] for r in intermediate["history"]] == [1, 2, 3]
    assert intermediate["optimizer"]["state"]  # Adam's moments travel with the weights

    resumed_records = []
    train(tiny_recipe(tiny_corpus), str(path), resume=str(path), progress=False, log=resumed_records.append)
    assert_same_weights(weights(out), weights(path))
    final = torch.load(path, map_location="cpu", weights_only=True)
    assert final["step"] == STEPS
    assert [r["step"] for r in final["history"]] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed_records] == [4, 5, 6]
    # The resumed half saw the same batches and optimiser state: same training losses.
    assert [r["train_loss"] for r in resumed_records] == [r["train_loss"] for r in records[3:]]


def test_resume_refuses_a_different_recipe(tmp_path, tiny_corpus, baseline):
    out, _, _ = baseline
    with pytest.raises(UserError, match="different recipe"):
        train(tiny_recipe(tiny_corpus, lr=0.5), str(tmp_path / "x.pt"), resume=str(out), progress=False)
    assert not (tmp_path / "x.pt").exists()


def test_checkpoint_is_plain_data_and_records_its_provenance(baseline, tiny_corpus):
    out, metrics, _ = baseline
    raw = torch.load(out, map_location="cpu", weights_only=True)  # no arbitrary unpickling needed
    assert raw["format"] == "circuitir-checkpoint" and raw["step"] == STEPS and raw["seed"] == 0
    assert raw["recipe"] == tiny_recipe(tiny_corpus).to_dict()
    assert raw["corpus"]["files"] == 4 and len(raw["corpus"]["sha256"]) == 64
    assert raw["tokenizer"] == {"kind": "bytes"}

    loaded = load_model(out)
    assert loaded.meta["metrics"]["val_loss"] == metrics["val_loss"]
    assert not loaded.model.training
    assert set(metrics["tasks"]) >= {"single_double_quote", "bracket_counting"}
    for row in metrics["tasks"].values():
        assert 0 <= row["accuracy"] <= 1 and row["loss"] > 0 and row["n"] == 512


def test_trained_matrices_are_at_their_target_density(baseline):
    out, metrics, _ = baseline
    recipe = PRESETS["tiny"]
    loaded = load_model(out)
    for name, param in loaded.model.sparse_parameters().items():
        target = recipe.embed_density if ("wte" in name or "lm_head" in name) else recipe.density
        rows, cols = param.shape
        forced = rows * min(4, cols) + cols * min(4, rows)
        nonzero = int(torch.count_nonzero(param))
        assert nonzero <= max(nonzeros_for(param.numel(), target), forced), name
        assert nonzero < param.numel(), name
        assert ((param != 0).sum(1) >= min(4, cols)).all(), name
        assert metrics["weight_density"][name] == pytest.approx(nonzero / param.numel())
    # The positional embedding stays zero and frozen.
    assert torch.count_nonzero(loaded.model.transformer.wpe.weight) == 0


def test_dense_run_keeps_every_weight(tmp_path, tiny_corpus):
    out = tmp_path / "dense.pt"
    train(tiny_recipe(tiny_corpus, dense=True, density=1.0, embed_density=1.0, steps=2, eval_every=10),
          str(out), progress=False)
    state = weights(out)
    assert torch.count_nonzero(state["transformer.h.0.mlp.c_fc.weight"]) == state[
        "transformer.h.0.mlp.c_fc.weight"].numel()


def test_task_mix_draws_rows_from_task_text(tmp_path, tiny_corpus):
    from circuitir.models.tokenizer import ByteTokenizer
    from circuitir.models.train import Batches, task_text_pool

    pool = task_text_pool(ByteTokenizer(), n_per_task=20)
    corpus = torch.tensor(list(b"# only comments here\n" * 40))
    recipe = tiny_recipe(tiny_corpus, task_mix=1.0, batch_size=4)
    inputs, targets = Batches(corpus, pool, recipe, 16).get(0)
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert all(bytes(row.tolist()) not in bytes(corpus.tolist()) for row in inputs)
    recipe.task_mix = 0.0
    inputs, _ = Batches(corpus, pool, recipe, 16).get(0)
    assert all(bytes(row.tolist()) in bytes(corpus.tolist()) for row in inputs)


def test_corpus_smaller_than_one_window_is_a_user_error(tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    (root / "b.py").write_text("y = 2\n")
    with pytest.raises(UserError, match="training window"):
        train(tiny_recipe(root), str(tmp_path / "out.pt"), progress=False)
    assert not (tmp_path / "out.pt").exists()


def test_corpus_is_identified_by_content(tmp_path):
    from circuitir.data.corpus import load_corpus

    write_corpus(tmp_path / "a")
    write_corpus(tmp_path / "b")
    a, b = load_corpus(tmp_path / "a"), load_corpus(tmp_path / "b")
    assert a.sha256 == b.sha256 and torch.equal(a.train, b.train)
    (tmp_path / "b" / "module_0.py").write_text("changed = True\n")
    assert load_corpus(tmp_path / "b").sha256 != a.sha256


def test_train_writes_a_safetensors_model(tmp_path, tiny_corpus):
    """`train -o M.safetensors`: the weights a .pt run gets, its provenance, no optimiser state, and it
    loads and evaluates like the .pt."""
    import json

    from conftest import cli

    runs = {}
    for suffix in ("pt", "safetensors"):
        out = tmp_path / f"m.{suffix}"
        code, stdout, err = cli("train", "--preset", "tiny", "--steps", STEPS, "--corpus", tiny_corpus,
                                "-o", out, "--json", "--quiet")
        assert code == 0, err
        runs[suffix] = (load_model(out), json.loads(stdout))
    (pt, pt_metrics), (st, st_metrics) = runs["pt"], runs["safetensors"]
    assert_same_weights(pt.model.state_dict(), st.model.state_dict())
    assert st_metrics["val_loss"] == pt_metrics["val_loss"]
    assert st.meta["metrics"]["val_loss"] == st_metrics["val_loss"] and st.meta["step"] == STEPS
    assert st.meta["corpus"]["sha256"] == pt.meta["corpus"]["sha256"]
    assert st.meta["recipe"] == pt.meta["recipe"] and "optimizer" not in st.meta
    assert leftover_parts(tmp_path) == []
    evals = [cli("eval", tmp_path / f"m.{suffix}", "--task", "quotes", "-n", 64, "--json") for suffix in runs]
    assert [code for code, _, _ in evals] == [0, 0]
    assert json.loads(evals[0][1]) == json.loads(evals[1][1])
    code, _, err = cli("train", "-o", tmp_path / "again.pt", "--resume", tmp_path / "m.safetensors")
    assert code == 2 and "no optimiser state" in err and err.count("\n") == 1


def test_snapshots_keep_the_run_and_record_their_validation_loss(tmp_path, tiny_corpus, baseline):
    """--keep-every writes OUT-stepN.pt with that step's weights and loss, and leaves the run unchanged."""
    from circuitir.models.train import snapshot_path

    out, metrics, records = baseline
    path = tmp_path / "run.pt"
    train(tiny_recipe(tiny_corpus), str(path), progress=False, keep_every=2)
    assert_same_weights(weights(out), weights(path))
    snapshots = sorted(name for name in os.listdir(tmp_path) if "-step" in name)
    assert snapshots == ["run-step2.pt", "run-step4.pt"]  # the last step is the output itself
    assert snapshot_path(path, 4) == tmp_path / "run-step4.pt"
    for step in (2, 4):
        raw = torch.load(snapshot_path(path, step), map_location="cpu", weights_only=True)
        assert raw["step"] == step and "optimizer" not in raw
        assert raw["training"] == torch.load(path, map_location="cpu", weights_only=True)["training"] == \
            {"world_size": 1, "device": "cpu", "dtype": "float32"}
        logged = next(r for r in records if r["step"] == step)  # eval_every=1 logs every step
        assert raw["metrics"]["val_loss"] == logged["val_loss"]
        assert load_model(snapshot_path(path, step)).meta["step"] == step
    differing = [k for k, v in weights(snapshot_path(path, 4)).items() if not torch.equal(v, weights(path)[k])]
    assert differing, "step 4 and step 6 weights should differ"


def test_a_snapshot_between_log_lines_computes_its_own_validation_loss(tmp_path, tiny_corpus, baseline):
    from circuitir.data.corpus import load_corpus
    from circuitir.models.train import snapshot_path, validation_loss

    out, _, _ = baseline
    path = tmp_path / "run.pt"
    records = []
    train(tiny_recipe(tiny_corpus, eval_every=5), str(path), progress=False, keep_every=3, log=records.append)
    assert [r["step"] for r in records] == [5, 6]  # step 3 is not a log line
    assert_same_weights(weights(out), weights(path))
    snapshot = load_model(snapshot_path(path, 3))
    corpus = load_corpus(str(tiny_corpus), snapshot.tokenizer)
    assert snapshot.meta["metrics"]["val_loss"] == pytest.approx(validation_loss(snapshot.model, corpus.validation),
                                                                 abs=1e-6)
