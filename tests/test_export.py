"""export: graph JSON (circuit-tracer/Neuronpedia shape), circuit tensors as safetensors, models as safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from circuitir.grammar import emit
from circuitir.ir.ablation import site_means
from circuitir.ir.circuit import Circuit
from circuitir.models.checkpoint import file_sha256, load_model, save_checkpoint
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.tasks import get_task
from circuitir.tasks.evaluate import encode_examples

from conftest import cli, randomize_, tiny_config

CANDIDATES = [ord('"'), ord("'")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = randomize_(SparseGPT(tiny_config(block_size=128)), seed=3).eval()
    with torch.no_grad():
        for param in model.sparse_parameters().values():  # sparse, so the circuit is small
            param.mul_(torch.rand(param.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
        model.transformer.wpe.weight.zero_()  # as in trained models: circuits need it zero
    model_path = root / "m.pt"
    sha = save_checkpoint(model_path, model, ByteTokenizer())
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    means = site_means(model, tokens)
    mask = {name: torch.rand(site.width, generator=torch.Generator().manual_seed(7)) < 0.5
            for name, site in model.sites().items()}
    circuit = Circuit.from_mask(model, mask, ablation="mean", means=means, candidates=CANDIDATES)
    circuit.header.update(source={"sha256": sha, "file": "m.pt", "tokenizer": {"kind": "bytes"}},
                          task={"name": "single_double_quote", "loss": "binary_ce_last_position"})
    path = root / "c.cir"
    path.write_text(emit(circuit))
    return {"root": root, "model": model, "model_path": model_path, "circuit": circuit, "path": path}


def test_graph_json_has_every_node_and_weight(setup):
    circuit = setup["circuit"]
    code, out, err = cli("export", setup["path"], "--format", "json")
    assert code == 0, err
    graph = json.loads(out)
    assert set(graph) == {"metadata", "qParams", "nodes", "links"}
    nodes = {row["node_id"]: row for row in graph["nodes"]}
    assert set(nodes) == {str(n) for n in circuit.nodes}
    kept = [row for row in graph["nodes"] if row["node_kind"] == "kept"]
    assert len(kept) == circuit.n_nodes == graph["metadata"]["node_count"]
    weights = {(l["source"], l["target"]): l["weight"] for l in graph["links"] if l["kind"] == "weight"}
    assert weights == {(str(s), str(d)): pytest.approx(w) for (s, d), w in circuit.edges.items()}
    counted = [l for l in graph["links"] if nodes[l["source"]]["node_kind"] == "kept"]
    assert len(counted) == circuit.n_edges == graph["metadata"]["edge_count"]
    for link in graph["links"]:
        if link["kind"] == "residual":
            assert link["weight"] == 1.0 and link["source"].split("[")[1] == link["target"].split("[")[1]
    logits = [row for row in graph["nodes"] if row["is_target_logit"]]
    assert [(row["token_id"], row["token"]) for row in logits] == [(ord('"'), '"'), (ord("'"), "'")]
    some = next(row for row in kept if row["site_kind"] == "post_act") if any(
        row["site_kind"] == "post_act" for row in kept) else kept[0]
    assert some["layer"] == some["site"].split(".")[0] and some["feature"] == some["index"]
    assert some["ctx_idx"] == 0 and some["stats"] is None


def test_graph_json_statistics_match_the_model(setup):
    out = setup["root"] / "g.json"
    code, _, err = cli("export", setup["path"], "--model", setup["model_path"], "-n", "16", "-o", out)
    assert code == 0, err
    graph = json.loads(out.read_text())
    row = next(r for r in graph["nodes"] if r["node_kind"] == "kept")
    # Independently: hook the site, average over the real tokens of the same 16 held-out prompts.
    task = get_task("single_double_quote")
    batch = encode_examples(task, task.examples("heldout", 16, 0), ByteTokenizer(), 128)
    captured = []
    model = setup["model"]
    handle = model.sites()[row["site"]].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        model(batch.tokens)
    handle.remove()
    values = captured[0][..., row["index"]].double()
    real = torch.arange(values.shape[1])[None, :] <= batch.last[:, None]
    assert row["stats"]["mean"] == pytest.approx(float(values[real].mean()), abs=1e-6)
    assert row["stats"]["max_abs"] == pytest.approx(float(values[real].abs().max()), abs=1e-6)
    assert row["stats"]["last_mean"] == pytest.approx(float(values[torch.arange(16), batch.last].mean()), abs=1e-6)


def test_circuit_safetensors_holds_its_tensors(setup):
    circuit, out = setup["circuit"], setup["root"] / "c.safetensors"
    code, _, err = cli("export", setup["path"], "--format", "safetensors", "-o", out)
    assert code == 0, err
    with safe_open(str(out), framework="pt") as handle:
        meta = json.loads(handle.metadata()["circuitir"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    names = meta["nodes"]
    edges = {(names[s], names[d]): float(w) for s, d, w in
             zip(tensors["edges.src"].tolist(), tensors["edges.dst"].tolist(), tensors["edges.weight"])}
    assert edges == {(str(s), str(d)): w for (s, d), w in circuit.edges.items()}
    for channel, row in zip(tensors["embed.channels"].tolist(), tensors["embed"]):
        assert torch.equal(row, circuit.embed[channel].float())
    assert meta["candidates"] == CANDIDATES and meta["header"]["source"]["file"] == "m.pt"
    assert set(meta["kinds"]) <= {"kept", "const", "output"}
    code, _, err = cli("export", setup["path"], "--format", "safetensors")
    assert code == 2 and "give -o" in err


@pytest.mark.parametrize("tied", [False, True])
def test_models_save_and_load_as_safetensors(tmp_path, tied, random_tokens):
    model = randomize_(SparseGPT(tiny_config(tied_unembed=tied)), seed=4).eval()
    path = tmp_path / "m.safetensors"
    sha = save_checkpoint(path, model, ByteTokenizer(), recipe={"steps": 3}, metrics={"val_loss": 1.5},
                          optimizer={"state": {}})
    loaded = load_model(path)
    assert sha == file_sha256(path) == loaded.sha256
    assert loaded.meta["recipe"] == {"steps": 3} and "optimizer" not in loaded.meta
    tokens = random_tokens()
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model(tokens))


def test_cli_converts_a_model_to_safetensors(setup, tmp_path, random_tokens):
    out = tmp_path / "m.safetensors"
    code, _, err = cli("export", setup["model_path"], "--format", "safetensors", "-o", out)
    assert code == 0, err
    tokens = random_tokens(2, 32)
    with torch.no_grad():
        assert torch.equal(load_model(out).model(tokens), setup["model"](tokens))
    code, _, err = cli("eval", out, "--task", "quotes", "-n", "8")
    assert code == 0, err


def test_foreign_or_broken_safetensors_are_one_line(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    code, _, err = cli("eval", tmp_path / "other.safetensors", "--task", "quotes")
    assert code == 2 and "not a circuitir safetensors checkpoint" in err and err.count("\n") == 1
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    code, _, err = cli("eval", tmp_path / "cut.safetensors", "--task", "quotes")
    assert code == 2 and "cannot read checkpoint" in err and err.count("\n") == 1
    code, _, err = cli("train", "-o", tmp_path / "x.pt", "--resume", tmp_path / "other.safetensors")
    assert code == 2 and err.count("\n") == 1
