"""Bridges: the hybrid-graph pass, the objective's terms, bridge training, eval, steering, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from circuitir.cli import main
from circuitir.ir.bridge import boundaries, hybrid, residuals, suffix
from circuitir.ir.trace import trace
from circuitir.models.bridges import BridgeRecipe, Bridges, Encoder, kl_divergence, nmse, train_bridges
from circuitir.models.checkpoint import load_model, save_checkpoint
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.runtime.steer import parse_strengths, steered_graph

from conftest import cli, default_sigint, refused_on_cuda

BLOCK = 128  # task prompts (single_double_quote) fit


def identity_bridge(width: int) -> nn.Linear:
    linear = nn.Linear(width, width)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(width))
        linear.bias.zero_()
    return linear


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_identity_hybrid_reproduces_model(make_model, random_tokens):
    model = make_model(seed=1)
    before = state(model)
    ir = trace(model)
    tokens = random_tokens(batch=2, length=16)
    expected = model(tokens)
    encoder = Encoder(8, 8, k=8)
    encoder.linear.load_state_dict(identity_bridge(8).state_dict())
    for point in boundaries(model.config):
        for bridge in (identity_bridge(8), encoder, None):
            torch.testing.assert_close(hybrid(ir, ir, point, bridge)(tokens), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(suffix(ir, point)(tokens, residuals(ir)(tokens)[1][point]), expected,
                                   rtol=0, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hybrid_is_prefix_bridge_suffix(make_model, random_tokens):
    dense, sparse = make_model(seed=1), make_model(seed=2, d_model=12, d_mlp=20)
    dense_ir, sparse_ir = trace(dense), trace(sparse)
    tokens = random_tokens(batch=2, length=16)
    torch.manual_seed(0)
    bridges = Bridges(boundaries(dense.config), 8, 12, encoder_k=5)
    _, dense_h = residuals(dense_ir)(tokens)
    _, sparse_h = residuals(sparse_ir)(tokens)
    for point in bridges.points:
        enc, dec = bridges.encoder(point), bridges.decoder(point)
        got = hybrid(dense_ir, sparse_ir, point, enc)(tokens)
        torch.testing.assert_close(got, suffix(sparse_ir, point)(tokens, enc(dense_h[point])), rtol=0, atol=1e-6)
        got = hybrid(sparse_ir, dense_ir, point, dec)(tokens)
        torch.testing.assert_close(got, suffix(dense_ir, point)(tokens, dec(sparse_h[point])), rtol=0, atol=1e-6)
        # the encoder is AbsTopK(Linear): k of 12 channels survive
        assert int((enc(dense_h[point]) != 0).sum(-1).max()) == 5
    # the residual at "0.attn" is the embedding; at "final" the input of ln_f
    embed = dense.transformer.wte(tokens) + dense.transformer.wpe.weight[:16]
    torch.testing.assert_close(dense_h["0.attn"], embed)


def test_hybrid_of_a_masked_graph(make_model, random_tokens):
    """explain's composition: a masked sparse graph (ir/masked.py) spliced into the dense suffix."""
    from circuitir.ir.masked import mask_graph
    from circuitir.ir.trace import GraphIR
    dense, sparse = make_model(seed=1), make_model(seed=2)
    dense_ir, sparse_ir = trace(dense), trace(sparse)
    tokens = random_tokens()
    fills = {name: torch.full((site.width,), 0.3) for name, site in sparse.sites().items()}
    keep = {name: torch.ones(site.width, dtype=torch.bool) for name, site in sparse.sites().items()}

    def masked(mask):
        return GraphIR(mask_graph(sparse_ir, fills, mask), sparse_ir.sites, sparse_ir.nonzeros, sparse_ir.norms)
    bridge = identity_bridge(8)
    plain = hybrid(sparse_ir, dense_ir, "1.mlp", bridge)(tokens)
    torch.testing.assert_close(hybrid(masked(keep), dense_ir, "1.mlp", bridge)(tokens), plain, rtol=0, atol=1e-6)
    keep["0.mlp.resid_delta"][:] = False  # ablate a write before the boundary: the residual changes by its fill
    got = hybrid(masked(keep), dense_ir, "1.mlp", bridge)(tokens)
    assert not torch.allclose(got, plain)
    keep["0.mlp.resid_delta"][:] = True
    keep["1.mlp.post_act"][:] = False  # after the boundary: the sparse suffix is not in the hybrid
    torch.testing.assert_close(hybrid(masked(keep), dense_ir, "1.mlp", bridge)(tokens), plain, rtol=0, atol=1e-6)


def test_hybrid_graph_shares_no_gradients(make_model, random_tokens):
    dense, sparse = make_model(seed=1), make_model(seed=2)
    bridge = identity_bridge(8)
    module = hybrid(trace(dense), trace(sparse), "1.attn", bridge)
    assert not module(random_tokens()).requires_grad  # constant copies: nothing of either model is trained
    assert all(not p.requires_grad for p in module.parameters())
    live = hybrid(trace(dense), trace(sparse), "1.attn", bridge, live=True)
    live(random_tokens()).sum().backward()
    assert bridge.weight.grad is not None and dense.lm_head.weight.grad is None  # dense prefix does not reach the output
    assert sparse.lm_head.weight.grad is not None


def test_nmse_and_kl_by_hand():
    target = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])          # channel means 2, 4; centred var = (1+1+4+4)/4
    prediction = torch.tensor([[[1.0, 3.0], [2.0, 6.0]]])      # squared errors 0, 1, 1, 0 -> MSE 0.5
    assert float(nmse(prediction, target)) == pytest.approx(0.5 / 2.5)
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    by_hand = 0.75 * torch.log(torch.tensor(1.5)) + 0.25 * torch.log(torch.tensor(0.5))
    assert float(kl_divergence(p.log()[None, None], q.log()[None, None])) == pytest.approx(float(by_hand))
    assert float(kl_divergence(p.log()[None], p.log()[None])) == 0.0


def test_steered_graph_adds_at_the_read(make_model, random_tokens):
    model = make_model(seed=3)
    tokens = random_tokens(batch=2, length=16)
    delta = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    graph = steered_graph(trace(model), "final", delta)
    torch.testing.assert_close(graph(tokens), model(tokens), rtol=0, atol=0)
    graph.steer_strength.fill_(0.5)
    _, h = residuals(trace(model))(tokens)
    by_hand = model.lm_head(model.transformer.ln_f(h["final"]) + 0.5 * delta) + model.final_logits_bias
    torch.testing.assert_close(graph(tokens), by_hand, rtol=1e-6, atol=1e-6)


def test_steered_graph_adds_to_the_residual_stream(make_model, random_tokens):
    """into="residual": the change is in the stream every later sublayer reads, i.e. the dense suffix run from
    the shifted residual; the read-only change at the same boundary differs from it."""
    model = make_model(seed=3)
    tokens = random_tokens(batch=2, length=16)
    delta = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    graph_ir = trace(model)
    graph = steered_graph(graph_ir, "1.attn", delta, "residual")
    torch.testing.assert_close(graph(tokens), model(tokens), rtol=0, atol=0)
    graph.steer_strength.fill_(0.5)
    _, h = residuals(graph_ir)(tokens)
    by_hand = suffix(graph_ir, "1.attn")(tokens, h["1.attn"] + 0.5 * delta)
    torch.testing.assert_close(graph(tokens), by_hand, rtol=1e-5, atol=1e-5)
    read_only = steered_graph(graph_ir, "1.attn", delta, "read")
    read_only.steer_strength.fill_(0.5)
    assert not torch.allclose(read_only(tokens), by_hand, atol=1e-3)


def test_parse_strengths():
    assert parse_strengths("0,0.25, 1") == [0.0, 0.25, 1.0]
    from circuitir.errors import UserError
    for bad in ("0,a", "", "nan", ",,"):
        with pytest.raises(UserError):
            parse_strengths(bad)


# ---------------------------------------------------------------- training and the CLI

def write_model(path, model, corpus, tokenizer_spec=None) -> str:
    tokenizer = ByteTokenizer()
    if tokenizer_spec is not None:
        tokenizer = type("T", (), {"spec": tokenizer_spec})()
    return save_checkpoint(path, model, tokenizer, recipe={"corpus": str(corpus), "task_mix": 0.0,
                                                           "model": model.config.to_dict()})


@pytest.fixture
def pair(tmp_path, make_model, tiny_corpus):
    dense = tmp_path / "dense.pt"
    sparse = tmp_path / "sparse.pt"
    write_model(dense, make_model(seed=1, block_size=BLOCK), tiny_corpus)
    write_model(sparse, make_model(seed=2, block_size=BLOCK, d_model=12), tiny_corpus)
    return dense, sparse


def recipe(**overrides) -> BridgeRecipe:
    fields = dict(steps=4, batch_size=2, eval_every=2, checkpoint_every=2, lr=1e-2)
    fields.update(overrides)
    return BridgeRecipe(**fields)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_bridge_train_frozen_models_deterministic_and_loadable(tmp_path, pair):
    dense, sparse = pair
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    train_bridges(str(dense), str(a), str(sparse), recipe(), progress=False)
    train_bridges(str(dense), str(b), str(sparse), recipe(), progress=False)
    assert sha(a) == sha(b)
    loaded = load_model(a)  # a plain sparse model to every other command
    original = load_model(sparse)
    assert all(torch.equal(v, original.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    raw = torch.load(a, weights_only=True)
    assert raw["dense_sha256"] == sha(dense) and raw["sparse_sha256"] == sha(sparse)
    assert "optimizer" not in raw and raw["bridge_config"]["d_dense"] == 8 and raw["bridge_config"]["d_sparse"] == 12


def test_bridge_training_lowers_the_objective(tmp_path, pair):
    dense, sparse = pair
    logged = []
    train_bridges(str(dense), str(tmp_path / "o.pt"), str(sparse), recipe(steps=30, eval_every=1,
                  least_squares_init=False), progress=False, log=logged.append)
    assert logged[-1]["loss"] < 0.8 * logged[0]["loss"]


def test_bridge_train_resume_equals_uninterrupted(tmp_path, pair):
    dense, sparse = pair
    whole, cut = tmp_path / "whole.pt", tmp_path / "cut.pt"
    train_bridges(str(dense), str(whole), str(sparse), recipe(), progress=False)

    def stop(record):
        if record["step"] == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_bridges(str(dense), str(cut), str(sparse), recipe(), progress=False, log=stop)
    assert torch.load(cut, weights_only=True)["step"] == 2
    train_bridges(str(dense), str(cut), resume=str(cut), progress=False)
    assert sha(cut) == sha(whole)


def test_joint_training_trains_a_weight_sparse_model(tmp_path, pair):
    dense, _ = pair
    out = tmp_path / "joint.pt"
    sparse_recipe = dict(model=dict(n_layer=2, n_head=2, d_head=8, d_model=16, d_mlp=64, block_size=BLOCK),
                         density=0.25, embed_density=0.5, anneal_start=0.0, anneal_end=0.5, steps=6,
                         corpus=None)
    logged = []
    train_bridges(str(dense), str(out), None, recipe(steps=6, sparse_recipe=sparse_recipe, eval_every=1),
                  progress=False, log=logged.append)
    assert "lm" in logged[0] and "kl_d2s/final" in logged[0]
    loaded = load_model(out)
    c_fc = loaded.model.transformer.h[0].mlp.c_fc.weight
    assert (c_fc != 0).float().mean() == pytest.approx(0.25, abs=0.02)
    assert torch.load(out, weights_only=True)["sparse_sha256"] is None


def test_joint_training_warm_started_from_a_trained_sparse_model(tmp_path, pair, tiny_corpus, monkeypatch):
    """--init-sparse: the start's weights are trained on, at the start's density, and a resume is exact."""
    from circuitir.models import train as training
    from circuitir.models.train import PRESETS, Recipe, train
    dense, _ = pair
    start_recipe = Recipe(**PRESETS["tiny"].to_dict())
    start_recipe.model.update(n_layer=2, block_size=BLOCK)
    start_recipe.steps, start_recipe.corpus, start_recipe.density = 4, str(tiny_corpus), 0.25
    start = tmp_path / "start.pt"
    train(start_recipe, str(start), progress=False)
    before = load_model(start).model.state_dict()
    out, cut = tmp_path / "warm.pt", tmp_path / "cut.pt"
    logged, densities = [], []
    project = training.sparsify

    def recording_sparsify(model, recipe_, density):
        densities.append(density)
        return project(model, recipe_, density)
    monkeypatch.setattr(training, "sparsify", recording_sparsify)
    train_bridges(str(dense), str(out), None, recipe(steps=4), progress=False, log=logged.append,
                  init_sparse=str(start))
    monkeypatch.undo()
    assert densities == [0.25] * 4  # every step at the start's density: no anneal from dense
    assert "lm" in logged[0] and "kl_s2d/final" in logged[0]
    raw = torch.load(out, weights_only=True)
    assert raw["bridge_recipe"]["init_sparse_sha256"] == sha(start) and raw["sparse_sha256"] is None
    after = load_model(out).model.state_dict()
    c_fc = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(after[c_fc], before[c_fc])
    # trained on from the start's weights (a fresh initialisation would be unrelated to them: cosine ~0)
    for key in (c_fc, "transformer.wte.weight"):
        assert F.cosine_similarity(after[key].flatten(), before[key].flatten(), dim=0) > 0.8, key
    assert int((after[c_fc] != 0).sum()) == pytest.approx(int((before[c_fc] != 0).sum()), rel=0.02)

    def stop(record):
        if record["step"] == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_bridges(str(dense), str(cut), None, recipe(steps=4), progress=False, log=stop,
                      init_sparse=str(start))
    train_bridges(str(dense), str(cut), resume=str(cut), progress=False)
    assert sha(cut) == sha(out)


def test_init_sparse_refuses_a_snapshot_taken_mid_anneal(capsys, tmp_path, pair, tiny_corpus):
    """A --keep-every snapshot from before the anneal ended is denser than its recipe's density; joint training
    would project it there at once. One line, exit 2; a snapshot from after the anneal is taken."""
    from circuitir.models.train import PRESETS, Recipe, snapshot_path, train
    dense, _ = pair
    start_recipe = Recipe(**PRESETS["tiny"].to_dict())
    start_recipe.model.update(n_layer=2, block_size=BLOCK)
    start_recipe.steps, start_recipe.corpus, start_recipe.density = 8, str(tiny_corpus), 0.25
    start_recipe.anneal_end = 0.5
    run = tmp_path / "run.pt"
    train(start_recipe, str(run), progress=False, keep_every=2)
    code, out, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--init-sparse", snapshot_path(run, 2),
                             "--steps", "1", "--batch-size", "2", "-o", tmp_path / "o.pt", "--quiet")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "is step 2 of 8, taken before its weights had annealed to density 0.25 (from step 5 on)" in err
    code, out, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--init-sparse", snapshot_path(run, 4),
                             "--steps", "1", "--batch-size", "2", "-o", tmp_path / "o.pt", "--quiet")
    assert code == 2 and "is step 4 of 8" in err  # projected last at step index 3, still above 0.25
    assert not (tmp_path / "o.pt").exists()
    code, out, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--init-sparse", snapshot_path(run, 6),
                             "--steps", "1", "--batch-size", "2", "-o", tmp_path / "o.pt", "--quiet")
    assert code == 0, err


def test_init_sparse_refuses_a_dense_start_and_sparse_together(capsys, tmp_path, pair):
    dense, sparse = pair
    code, out, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--sparse", sparse, "--init-sparse",
                             sparse, "-o", tmp_path / "o.pt")
    assert code == 2 and out == "" and "give one of them" in err and err.count("\n") == 1
    trained_densely = tmp_path / "trained-densely.pt"
    raw = torch.load(dense, weights_only=True)
    torch.save({**raw, "dense": True}, trained_densely)
    code, out, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--init-sparse", trained_densely,
                             "-o", tmp_path / "o.pt", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "was trained densely" in err
    assert not (tmp_path / "o.pt").exists()
    code, out, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--init-sparse", sparse, "--resume",
                             tmp_path / "run.pt", "-o", tmp_path / "o.pt")
    assert code == 2 and "leave out --init-sparse" in err and not (tmp_path / "o.pt").exists()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bridged(tmp_path, pair):
    dense, sparse = pair
    out = tmp_path / "bridged.pt"
    train_bridges(str(dense), str(out), str(sparse), recipe(), progress=False)
    return dense, out


def test_refit_decoders_from_existing_bridges(tmp_path, bridged):
    """--bridges-from B --fit decoders: the encoders stay byte for byte, the decoders are trained (their KL
    falls), the encoder terms are not computed, and the file records B and what was fitted."""
    dense, start = bridged
    out = tmp_path / "refit.pt"
    logged = []
    train_bridges(str(dense), str(out), str(start), recipe(steps=30, eval_every=1, fit="decoders", nmse_weight=0.0),
                  progress=False, log=logged.append, init_bridges=str(start))
    before, after = (torch.load(path, weights_only=True)["bridge"] for path in (start, out))
    assert before.keys() == after.keys() and any(key.startswith("encoders.") for key in before)
    for key in before:
        assert torch.equal(before[key], after[key]) == key.startswith("encoders."), key
    points = torch.load(start, weights_only=True)["bridge_config"]["points"]
    assert logged[0].keys() == {"step", "loss", "seconds"} | {f"{term}/{point}" for term in ("nmse_dec", "kl_s2d")
                                                              for point in points}
    kl = [sum(v for k, v in record.items() if k.startswith("kl_s2d")) for record in logged]
    assert kl[-1] < 0.9 * kl[0]
    assert logged[-1]["loss"] == pytest.approx(kl[-1], rel=1e-4)  # the NMSE terms weighted 0
    raw = torch.load(out, weights_only=True)
    assert raw["bridge_recipe"]["init_bridges_sha256"] == sha(start) and raw["bridge_recipe"]["fit"] == "decoders"


def test_bridges_from_starts_at_their_maps_not_least_squares(tmp_path, bridged):
    """Every map trained at learning rate 0 from B: the output's bridges are B's (least squares would differ)."""
    dense, start = bridged
    out, fresh = tmp_path / "same.pt", tmp_path / "fresh.pt"
    train_bridges(str(dense), str(out), str(start), recipe(steps=1, lr=0.0), progress=False,
                  init_bridges=str(start))
    train_bridges(str(dense), str(fresh), str(start), recipe(steps=1, lr=0.0), progress=False)
    before, same, least_squares = (torch.load(p, weights_only=True)["bridge"] for p in (start, out, fresh))
    assert all(torch.equal(before[key], same[key]) for key in before)
    assert not all(torch.equal(before[key], least_squares[key]) for key in before)


def test_refit_bad_input(capsys, tmp_path, bridged, make_model, tiny_corpus):
    dense, start = bridged
    other = tmp_path / "other-sparse.pt"
    write_model(other, make_model(seed=3, block_size=BLOCK, d_model=12), tiny_corpus)
    out = tmp_path / "o.pt"
    for args, message in (
            (("--sparse", other, "--bridges-from", start),
             f"the bridges in {start} were fitted to another sparse model than {other}; give --sparse the sparse "
             f"model they couple (the bridged checkpoint holds it: --sparse {start})"),
            (("--sparse", start, "--bridges-from", other), "is not a bridged checkpoint"),
            (("--sparse", start, "--bridges-from", start, "--encoder-k", "3"), "have another shape"),
            (("--fit", "decoders"), "--fit and --bridges-from refine the bridges of two frozen models: give --sparse"),
            (("--bridges-from", start), "give --sparse"),
            (("--sparse", start, "--fit", "decoders", "--resume", start), "leave out --fit and --bridges-from")):
        code, stdout, err = run_cli(capsys, "bridge", "train", "--dense", dense, *args, "--steps", "1",
                                    "--batch-size", "2", "-o", out, "--quiet")
        assert code == 2 and stdout == "" and message in err and err.count("\n") == 1, (args, err)
        assert not out.exists()


def test_bridge_eval_cli(capsys, bridged):
    dense, out = bridged
    code, stdout, _ = run_cli(capsys, "bridge", "eval", out, "--dense", dense, "--task", "quotes", "-n", "8",
                              "--windows", "2", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert [row["boundary"] for row in result["boundaries"]] == ["0.attn", "0.mlp", "1.attn", "1.mlp", "final"]
    assert all(row["kl_d2s"] >= 0 and row["nmse_enc"] >= 0 and "task_loss_s2d" in row for row in result["boundaries"])
    dense_loss, gap = result["dense"]["lm_loss"], abs(result["sparse"]["lm_loss"] - result["dense"]["lm_loss"])
    for row in result["boundaries"]:
        for way in ("d2s", "s2d"):
            assert row[f"closer_{way}"] is (abs(row[f"lm_loss_{way}"] - dense_loss) < gap)
    code, stdout, _ = run_cli(capsys, "bridge", "eval", out, "--dense", dense, "-n", "8", "--windows", "2")
    closer = sum(row[f"closer_{way}"] for row in result["boundaries"] for way in ("d2s", "s2d"))
    assert code == 0 and stdout.count("*") == closer + 1  # one per closer hybrid, one in the legend
    assert f"than the sparse model's is: {closer} of 10 hybrids" in stdout


def test_steer_cli(capsys, bridged, tmp_path):
    dense, out = bridged
    plot = tmp_path / "steer.png"
    code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "single_double_quote",
                                "--node", "1.attn.act_in[3]", "--strength", "0,0.5,1", "-n", "6",
                                "--plot", plot, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["boundary"] == "1.attn" and result["channels"] == [3]
    assert [r["strength"] for r in result["bridge"]] == [0.0, 0.5, 1.0]
    assert result["bridge"][0] == result["random"][0]  # strength 0 is the dense model itself
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_steer_boundary_alone_takes_every_channel_there(capsys, bridged):
    """--boundary alone: every sparse channel at that boundary, the ceiling of what the bridge carries; with
    --node it must agree with the node's boundary, and it must be one of the bridge's boundaries."""
    dense, out = bridged
    code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "single_double_quote",
                                "--boundary", "1.mlp", "--strength", "0,1", "-n", "6", "--json")
    assert code == 0, err
    every = json.loads(stdout)
    assert every["boundary"] == "1.mlp" and every["channels"] == list(range(12))
    assert every["bridge"][0] == every["random"][0]
    code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "single_double_quote",
                                "--node", "1.mlp.act_in[3]", "--strength", "0,1", "-n", "6", "--json")
    one = json.loads(stdout)
    assert one["bridge"][0] == every["bridge"][0]  # the same dense model at strength 0
    assert one["mean_delta_norm"] < every["mean_delta_norm"]
    code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "single_double_quote",
                                "--boundary", "1.mlp", "--strength", "0,1", "-n", "6")
    assert code == 0 and "steering all 12 channels at 1.mlp (into the read)" in stdout
    for args, message in ((("--boundary", "2.attn"), "--boundary 2.attn: not a bridge boundary (one of 0.attn"),
                          (("--boundary", "final", "--node", "1.mlp.act_in[3]"),
                           "--node 1.mlp.act_in[3] is at boundary 1.mlp, not --boundary final")):
        code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "quotes", *args)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_steer_along_a_circuit_at_a_chosen_boundary(capsys):
    """--circuit with --boundary: that boundary's circuit channels (the first boundary it has channels at
    without it); a boundary it has none at, or --node beside --circuit, is one line and exit 2. On the shipped
    bridged model and its quotes circuit (channels at 0.mlp, 1.attn, 1.mlp and final)."""
    from circuitir.api import load
    from circuitir.models.checkpoint import load_model
    from circuitir.runtime.steer import circuit_reads
    repo = Path(__file__).resolve().parent.parent
    out, dense, circuit = repo / "models/bridged.pt", repo / "models/dense.pt", repo / "examples/bridged-quotes.cir"
    reads = circuit_reads(load(circuit), load_model(out).config)
    assert sorted(reads) == ["0.mlp", "1.attn", "1.mlp", "final"] and len(reads["1.attn"]) == 23
    for option, point in (((), "0.mlp"), (("--boundary", "1.attn"), "1.attn")):
        code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "single_double_quote",
                                    "--circuit", circuit, *option, "--strength", "0,1", "-n", "4", "--json")
        assert code == 0, err
        result = json.loads(stdout)
        assert (result["boundary"], result["channels"], result["selection"]) == (point, reads[point], "circuit")
    for args, message in ((("--node", "1.attn.act_in[3]"), "give --node or --circuit, not both"),
                          (("--boundary", "0.attn"), "the circuit has no channel at boundary 0.attn (it has some "
                                                     "at 0.mlp, 1.attn, 1.mlp, final)")):
        code, _, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "quotes", "--circuit", circuit,
                               *args)
        assert code == 2 and message in err and err.count("\n") == 1, err


def write_task_lines(path, rows) -> None:
    path.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.correct, "alternative": e.alternative,
                                        "split": split}) + "\n" for e, split in rows))


def test_bridge_eval_and_steer_take_a_task_file(capsys, bridged, tmp_path):
    """A file with a built-in task's prompts (and, for steering, their contrast partners) gives the numbers
    the built-in task gives."""
    from circuitir.runtime.steer import contrast_pairs
    from circuitir.tasks import get_task
    dense, out = bridged
    quotes = get_task("quotes")
    evaluated = tmp_path / "quotes.jsonl"
    write_task_lines(evaluated, [(e, "heldout") for e in quotes.examples("heldout", 8, 0)])
    runs = []
    for option in (("--task", "quotes"), ("--task-file", evaluated)):
        code, stdout, err = run_cli(capsys, "bridge", "eval", out, "--dense", dense, *option, "-n", "8",
                                    "--windows", "2", "--json")
        assert code == 0, err
        runs.append(json.loads(stdout))
    assert runs[1]["sparse"]["task_loss"] == pytest.approx(runs[0]["sparse"]["task_loss"], abs=1e-5)
    for ours, theirs in zip(runs[1]["boundaries"], runs[0]["boundaries"]):
        assert ours["task_loss_s2d"] == pytest.approx(theirs["task_loss_s2d"], abs=1e-5)
        assert ours["task_loss_d2s"] == pytest.approx(theirs["task_loss_d2s"], abs=1e-5)
    pairs = contrast_pairs(quotes, 6, 0)
    rows, seen = [], set()
    for example, split in [(a, "heldout") for a, _ in pairs] + [(b, "train") for _, b in pairs]:
        if example.prompt not in seen:
            seen.add(example.prompt)
            rows.append((example, split))
    steered = tmp_path / "pairs.jsonl"
    write_task_lines(steered, rows)
    runs = []
    for option in (("--task", "quotes"), ("--task-file", steered)):
        code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, *option, "--node", "1.attn.act_in[3]",
                                    "--strength", "0,1", "-n", "6", "--json")
        assert code == 0, err
        runs.append(json.loads(stdout))
    assert runs[1]["n"] == runs[0]["n"] == 6
    for name in ("bridge", "random"):
        for ours, theirs in zip(runs[1][name], runs[0][name]):
            assert ours["p_other"] == pytest.approx(theirs["p_other"], abs=1e-5)
            assert ours["p_correct"] == pytest.approx(theirs["p_correct"], abs=1e-5)
    lonely = tmp_path / "lonely.jsonl"
    write_task_lines(lonely, [(pairs[0][0], "heldout")])
    code, _, err = run_cli(capsys, "steer", out, "--dense", dense, "--task-file", lonely, "--node", "final_resid[0]")
    assert code == 2 and "no contrast pairs" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "steer", out, "--dense", dense, "--node", "final_resid[0]")
    assert code == 2 and "no task given" in err


@pytest.mark.parametrize("args, message", [
    (("--node", "1.attn.q[3]"), "not a residual read"),
    (("--node", "9.attn.act_in[3]"), "not a residual read"),
    (("--node", "1.attn.act_in[99]"), "out of range"),
    (("--node", "nonsense"), "not a node name"),
    (("--node", "1.attn.act_in[3]", "--strength", "0,x"), "cannot parse"),
])
def test_steer_bad_input(capsys, bridged, tmp_path, args, message):
    dense, out = bridged
    plot = tmp_path / "p.png"
    code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "quotes", *args, "--plot", plot)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not plot.exists()


def test_hash_and_tokenizer_mismatch(capsys, bridged, tmp_path, make_model, tiny_corpus):
    dense, out = bridged
    other = tmp_path / "other.pt"
    write_model(other, make_model(seed=5, block_size=BLOCK), tiny_corpus)
    code, _, err = run_cli(capsys, "bridge", "eval", out, "--dense", other)
    assert code == 2 and "not the dense model" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "steer", out, "--dense", other, "--task", "quotes", "--node", "final_resid[0]")
    assert code == 2 and "not the dense model" in err
    code, _, err = run_cli(capsys, "bridge", "eval", dense, "--dense", dense)
    assert code == 2 and "not a bridged checkpoint" in err
    odd = tmp_path / "odd.pt"
    write_model(odd, make_model(seed=2, block_size=BLOCK), tiny_corpus, tokenizer_spec={"kind": "bytes", "x": 1})
    target = tmp_path / "never.pt"
    code, _, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--sparse", odd, "-o", target, "--steps", "1")
    assert code == 2 and "different tokenizer" in err and not target.exists()


@pytest.fixture
def self_bridged(tmp_path, make_model, tiny_corpus):
    """A model bridged to itself by identity maps."""
    from circuitir.models.bridges import save_deterministic
    model = make_model(seed=4, block_size=BLOCK)
    dense = tmp_path / "dense.pt"
    digest = write_model(dense, model, tiny_corpus)
    bridges = Bridges(boundaries(model.config), 8, 8, encoder_k=8)
    for point in bridges.points:
        for linear in (bridges.encoder(point).linear, bridges.decoder(point)):
            linear.load_state_dict(identity_bridge(8).state_dict())
    out = tmp_path / "self.pt"
    save_deterministic(out, model, ByteTokenizer(), recipe={"corpus": str(tiny_corpus)},
                       bridge=bridges.state_dict(), bridge_config=bridges.config(), dense_sha256=digest)
    return dense, out


@pytest.mark.parametrize("into, boundary", [("read", "final"), ("residual", "final"), ("residual", "0.mlp"),
                                            ("residual", "1.attn")])
def test_steering_every_channel_through_identity_bridges_gives_the_counterfactual(capsys, self_bridged, into,
                                                                                 boundary):
    """A model bridged to itself: every channel at strength 1 moves each prompt to its contrast partner, so the
    'other' answer gets the probability the partner gives its own answer (and the actual one the probability
    the partner gives the other). Into the read that holds at the final boundary (the only read there); into
    the residual stream, at any boundary (everything after it reads the partner's stream)."""
    from circuitir.models.checkpoint import load_model
    from circuitir.runtime.steer import contrast_pairs
    from circuitir.tasks import get_task
    from circuitir.tasks.evaluate import encode_examples
    dense, out = self_bridged
    code, stdout, err = run_cli(capsys, "steer", out, "--dense", dense, "--task", "single_double_quote",
                                "--boundary", boundary, "--strength", "0,1", "-n", "8", "--into", into, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["into"] == into
    task, loaded = get_task("single_double_quote"), load_model(dense)
    partners = encode_examples(task, [b for _, b in contrast_pairs(task, 8, 0)], loaded.tokenizer, BLOCK)
    with torch.no_grad():
        probs = loaded.model(partners.tokens)[torch.arange(len(partners.last)), partners.last].softmax(-1)
    own = float(probs.gather(-1, partners.correct[:, None]).mean())
    theirs = float(probs.gather(-1, partners.alternative[:, None]).mean())
    assert result["bridge"][1]["p_other"] == pytest.approx(own, rel=1e-4)
    assert result["bridge"][1]["p_correct"] == pytest.approx(theirs, rel=1e-4)
    assert result["bridge"][0]["p_other"] != pytest.approx(own, rel=1e-3)  # strength 1 did move it


def test_bridge_eval_of_identity_bridges_between_one_model(capsys, self_bridged):
    """A model bridged to itself by identity maps: every NMSE and KL is 0, every hybrid loss the model's."""
    dense, out = self_bridged
    code, stdout, err = run_cli(capsys, "bridge", "eval", out, "--dense", dense, "--task", "quotes", "-n", "8",
                                "--windows", "2", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["sparse"]["lm_loss"] == pytest.approx(result["dense"]["lm_loss"], abs=1e-6)
    for row in result["boundaries"]:
        assert row["nmse_enc"] == row["nmse_dec"] == 0.0
        assert row["kl_d2s"] == pytest.approx(0, abs=1e-6) and row["kl_s2d"] == pytest.approx(0, abs=1e-6)
        assert row["lm_loss_d2s"] == pytest.approx(result["dense"]["lm_loss"], abs=1e-5)
        assert row["task_loss_s2d"] == pytest.approx(result["dense"]["task_loss"], abs=1e-5)


def test_explain_refuses_a_circuit_of_another_model(capsys, bridged):
    dense, out = bridged
    code, _, err = run_cli(capsys, "bridge", "explain", out, "--dense", dense, "--circuit",
                           "examples/sparse-quotes.cir")
    assert code == 2 and "was not extracted from the sparse model" in err and len(err.strip().splitlines()) == 1


def test_bridge_train_cli_joint_mode(capsys, tmp_path, make_model, tiny_corpus):
    dense = tmp_path / "dense1.pt"
    write_model(dense, make_model(seed=1, n_layer=1, block_size=BLOCK), tiny_corpus)
    out = tmp_path / "joint.pt"
    code, stdout, err = run_cli(capsys, "bridge", "train", "--dense", dense, "--preset", "tiny", "--steps", "2",
                                "--batch-size", "2", "-o", out, "--quiet")
    assert code == 0, err
    raw = torch.load(out, weights_only=True)
    assert raw["bridge_recipe"]["joint"] and raw["bridge_config"]["d_sparse"] == 16 and raw["sparse_path"] is None
    assert load_model(out).config.d_model == 16


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_bridge_train_interrupted_leaves_no_partial_file(tmp_path, pair, sig, code, word):
    """SIGTERM or SIGINT during `bridge train`: one line, the signal's exit code, no .part file; a checkpoint
    that exists was written whole before the signal."""
    dense, sparse = pair
    out = tmp_path / "b.pt"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "circuitir.cli", "bridge", "train", "--dense", str(dense),
                             "--sparse", str(sparse), "--steps", "1000000", "--batch-size", "2", "-o", str(out),
                             "--quiet", "--log", str(tmp_path / "log.jsonl")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(repo)},
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not (tmp_path / "log.jsonl").exists() and time.time() < deadline:  # training under way
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()
    assert err.decode() == f"circuitir bridge: {word}\n"
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []
    if out.exists():  # a periodic checkpoint
        assert torch.load(out, weights_only=True)["bridge_recipe"]["steps"] == 1000000


@pytest.fixture
def bridged_for_circuits(tmp_path, make_model, tiny_corpus):
    """A bridged checkpoint whose sparse model has the zero positional embedding circuits need."""
    dense, sparse = tmp_path / "dense.pt", tmp_path / "sparse.pt"
    write_model(dense, make_model(seed=1, block_size=BLOCK), tiny_corpus)
    model = make_model(seed=2, block_size=BLOCK, d_model=12)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    write_model(sparse, model, tiny_corpus)
    out = tmp_path / "bridged.pt"
    train_bridges(str(dense), str(out), str(sparse), recipe(), progress=False)
    return dense, out


def device_commands(bridged, tmp_path) -> dict:
    """bridge eval, bridge explain and steer: the bridge commands that run the models (training aside)."""
    dense, out = bridged
    circuit = tmp_path / "sparse.cir"
    pipeline = ("trace, mean-ablate{tokens=1024}, prune{target=2,steps=4,prompts=8,select=8,greedy=false}, "
                "lower, fold-constants, dce")
    code, _, err = cli("extract", out, "--task", "quotes", "-o", circuit, "--pipeline", pipeline)
    assert code == 0, err
    return {
        "bridge eval": ["bridge", "eval", out, "--dense", dense, "--task", "quotes", "-n", 8, "--windows", 2],
        "bridge explain": ["bridge", "explain", out, "--dense", dense, "--circuit", circuit, "-n", 8],
        "steer": ["steer", out, "--dense", dense, "--task", "quotes", "--node", "1.attn.act_in[3]",
                  "--strength", "0,1", "-n", 6, "--plot", tmp_path / "steer.png"],
    }


def test_bridge_commands_take_device_cpu_with_the_same_numbers(bridged_for_circuits, tmp_path):
    for name, argv in device_commands(bridged_for_circuits, tmp_path).items():
        code, plain, err = cli(*argv, "--json")
        assert code == 0, (name, err)
        code, on_cpu, err = cli(*argv, "--json", "--device", "cpu")
        assert code == 0, (name, err)
        assert json.loads(on_cpu) == json.loads(plain), name


def test_bridge_train_on_device_cpu_writes_the_same_bytes(tmp_path, pair):
    dense, sparse = pair
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    argv = ["bridge", "train", "--dense", dense, "--sparse", sparse, "--steps", "4", "--batch-size", "2", "--quiet"]
    assert cli(*argv, "-o", a)[0] == 0
    assert cli(*argv, "-o", b, "--device", "cpu")[0] == 0
    assert sha(a) == sha(b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bridge_commands_device_cuda_without_a_gpu_is_one_line_before_any_work(bridged_for_circuits, tmp_path, pair):
    dense, sparse = pair
    refused_on_cuda({**device_commands(bridged_for_circuits, tmp_path),
                     "bridge train": ["bridge", "train", "--dense", dense, "--sparse", sparse, "--steps", "2",
                                      "-o", tmp_path / "t.pt"]})
    assert not (tmp_path / "t.pt").exists()
    assert not (tmp_path / "steer.png").exists()


def test_shipped_joint_bridged_model_meets_the_hybrid_bar(capsys):
    """models/bridged-joint.pt (MODEL_CARD.md): at every boundary both hybrids' LM loss is closer to the dense
    model's than the sparse model's is, with the numbers the card gives; its quotes circuit is of this file."""
    from circuitir.api import load
    from circuitir.models.checkpoint import load_model
    repo = Path(__file__).resolve().parent.parent
    bridged, dense = repo / "models/bridged-joint.pt", repo / "models/dense.pt"
    code, stdout, err = run_cli(capsys, "bridge", "eval", bridged, "--dense", dense, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["sparse"]["lm_loss"] == pytest.approx(2.0193, abs=1e-4)
    assert [b["boundary"] for b in result["boundaries"]] == ["0.attn", "0.mlp", "1.attn", "1.mlp", "final"]
    assert all(b["closer_d2s"] and b["closer_s2d"] for b in result["boundaries"])
    assert result["boundaries"][-1]["lm_loss_s2d"] == pytest.approx(2.0034, abs=1e-4)
    circuit = load(repo / "examples/bridged-joint-quotes.cir")
    assert circuit.provenance.model_sha256 == load_model(bridged).sha256
