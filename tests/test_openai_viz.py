"""import-viz: OpenAI's released circuits (viz_data.pt, written here in their layout) as .cir files."""

from __future__ import annotations

import json

import pytest
import torch

from circuitir.grammar import parse
from circuitir.models.checkpoint import load_model

from conftest import cli, refused_on_cuda

PIPELINE = "trace, mean-ablate{tokens=4096}, prune{target=%s,steps=60,prompts=64,select=48}, lower, fold-constants, dce"


def viz_payload(kept: dict, config: dict, loss: float = 0.05, interv_loss: float = 0.1) -> dict:
    """OpenAI's viz_data.pt layout: kept indices per location, importances at twice the loss."""
    return {
        "circuit_data": {**{site: torch.tensor(sorted(idx), dtype=torch.long) for site, idx in kept.items()},
                         "prune_config": {"k_coef": 1e-4, "lr": 3e-3}},
        "importances": {"loss": 2 * loss, "interv_loss": 2 * interv_loss,
                        "ch_interv_losses": {site: [2 * interv_loss] * len(idx) for site, idx in kept.items()},
                        "layer_interv_losses": {}, "pair_data": [], "pair_data_connections": [],
                        "task_samples": [[torch.tensor([1, 2, 3, 0, 0])]], "beeg_model_config": dict(config)},
        "samples": {},
        "num_total_nodes": 1000,
    }


def write_viz(root, payload: dict, task_dir: str = "bracket_brace_beeg"):
    path = root / "viz" / "tiny" / task_dir / "prune_v4" / "k_optim" / "viz_data.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def setup(bracket_model, tmp_path_factory):
    path, metrics = bracket_model
    full = metrics["tasks"]["bracket_brace"]["loss"]
    target = 0.25 if full < 0.1 else round(full + 0.2, 2)
    root = tmp_path_factory.mktemp("viz")
    ours = root / "ours.cir"
    code, _, err = cli("extract", path, "--task", "bracket_brace", "-o", ours, "--pipeline", PIPELINE % target)
    assert code == 0, err
    circuit = parse(ours.read_text(), str(ours))
    kept: dict[str, list[int]] = {}
    for node in circuit.kept_nodes():
        kept.setdefault(node.site, []).append(node.index)
    loaded = load_model(path)
    config = {**loaded.config.to_dict(), "tokenizer_name": "tinypython_2k", "flash": False}
    return {"model": path, "root": root, "ours": ours, "circuit": circuit, "kept": kept, "config": config,
            "target": target}


def test_import_gives_the_circuit_the_file_names_and_it_checks(setup):
    viz = write_viz(setup["root"], viz_payload(setup["kept"], setup["config"]))
    out = setup["root"] / "theirs.cir"
    # The task comes from the path (bracket_brace_beeg -> bracket_brace); the means match extraction's.
    code, stdout, err = cli("import-viz", viz, "--model", setup["model"], "-o", out, "--mean-tokens", "4096",
                            "--target-loss", setup["target"], "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    imported = parse(out.read_text(), str(out))
    assert imported.kept_nodes() == setup["circuit"].kept_nodes()
    assert summary["imported_nodes"] == summary["nodes"] == setup["circuit"].n_nodes
    assert summary["edges"] == setup["circuit"].n_edges and summary["dropped_nodes"] == 0
    assert imported.header["task"]["name"] == "bracket_brace"
    assert imported.header["openai"]["interv_loss"] == pytest.approx(0.1)  # stored doubled, read halved
    assert imported.header["openai"]["loss"] == pytest.approx(0.05)
    assert len(imported.header["openai"]["viz_sha256"]) == 64
    # It runs, checks and diffs like an extracted circuit.
    code, stdout, err = cli("check", out, setup["model"], "--no-control", "-n", "64", "--json")
    assert code in (0, 1), err
    result = json.loads(stdout)
    assert result["faithfulness"]["exact"] and result["faithfulness"]["max_abs_logit_diff"] <= 1e-4
    assert result["sufficiency"]["loss"] == pytest.approx(summary["loss"], abs=0.2)
    code, stdout, err = cli("diff", setup["ours"], out, "--model", setup["model"], "--task", "bracket_brace",
                            "-n", "32", "--json")
    assert code in (0, 1), err
    diff = json.loads(stdout)
    assert diff["behavioural"]["n"] == 32
    structural = diff["structural"]
    assert structural["nodes"]["added"] == structural["nodes"]["removed"] == []
    assert structural["edges"]["added"] == structural["edges"]["removed"] == []


def test_per_node_importances_are_imported_halved(setup):
    """ch_interv_losses (one loss per kept channel, in circuit_data's order, stored doubled) land halved in
    the header table openai.node_loss and in the --json summary, by node name."""
    payload = viz_payload(setup["kept"], setup["config"])
    losses, expected = {}, {}
    for number, (site, indices) in enumerate(sorted(setup["kept"].items())):
        order = sorted(indices, reverse=True)  # the file's order, not ascending: losses follow it
        payload["circuit_data"][site] = torch.tensor(order, dtype=torch.long)
        values = [0.5 + number + 0.125 * i for i in range(len(order))]
        losses[site] = torch.tensor([2 * v for v in values])
        expected.update({f"{site}[{index}]": v for index, v in zip(order, values)})
    payload["importances"]["ch_interv_losses"] = losses
    viz = write_viz(setup["root"], payload, "importances/bracket_brace")
    assert torch.load(viz, weights_only=True)["importances"]["ch_interv_losses"].keys() == losses.keys()
    out = setup["root"] / "importances.cir"
    code, stdout, err = cli("import-viz", viz, "--model", setup["model"], "-o", out, "--mean-tokens", "4096",
                            "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["openai"]["node_loss"] == expected
    assert len(expected) == setup["circuit"].n_nodes
    header = parse(out.read_text(), str(out)).header["openai"]
    assert header["node_loss"] == expected and header["interv_loss"] == pytest.approx(0.1)
    top = max(expected, key=expected.get)
    assert f'openai.node_loss."{top}" = {expected[top]!r}' in out.read_text()
    assert cli("fmt", "--check", out)[0] == 0
    code, stdout, err = cli("import-viz", viz, "--model", setup["model"], "-o", out, "--mean-tokens", "4096")
    assert code == 0 and f"per-node ablation losses for {len(expected)} nodes" in stdout and top in stdout


@pytest.mark.parametrize("change,message", [
    (lambda losses, unkept: losses.update({next(iter(losses)): torch.tensor([1.0] * 99)}), "has 99 losses for the"),
    (lambda losses, unkept: losses.update({unkept: torch.tensor([1.0])}), "which circuit_data does not keep"),
    (lambda losses, unkept: losses.update({next(iter(losses)): "high"}), "is not a list of losses"),
])
def test_malformed_importances_are_one_clear_line(setup, change, message):
    payload = viz_payload(setup["kept"], setup["config"])
    unkept = next(site for site in load_model(setup["model"]).model.sites() if site not in setup["kept"])
    change(payload["importances"]["ch_interv_losses"], unkept)
    viz = write_viz(setup["root"], payload, "badloss/bracket_brace")
    out = setup["root"] / "badloss.cir"
    code, stdout, err = cli("import-viz", viz, "--model", setup["model"], "-o", out)
    assert code == 2 and stdout == "" and message in err and err.count("\n") == 1 and not out.exists()


def test_nodes_with_no_path_to_the_logits_are_dropped_and_counted(setup):
    # Add to the circuit a residual read of layer 0's MLP that no kept neuron reads (zero weights).
    weight = load_model(setup["model"]).model.transformer.h[0].mlp.c_fc.weight
    neurons = setup["kept"].get("0.mlp.post_act", [])
    reads = setup["kept"].get("0.mlp.act_in", [])
    dead = next(c for c in range(weight.shape[1]) if c not in reads and not weight[neurons, c].any())
    kept = {**setup["kept"], "0.mlp.act_in": reads + [dead]}
    viz = write_viz(setup["root"], viz_payload(kept, setup["config"]), "partial/bracket_brace")
    out = setup["root"] / "partial.cir"
    code, stdout, err = cli("import-viz", viz, "--model", setup["model"], "-o", out, "--mean-tokens", "4096",
                            "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["imported_nodes"] == setup["circuit"].n_nodes + 1
    assert summary["dropped_nodes"] == 1 and summary["nodes"] == setup["circuit"].n_nodes


@pytest.mark.parametrize("change,message", [
    (lambda p: p["importances"]["beeg_model_config"].update(d_model=2048), "is for another model: its config has d_model 2048"),
    (lambda p: p["circuit_data"].update({"0.mlp.post_act": torch.tensor([5000])}), "keeps channel 5000"),
    (lambda p: p["circuit_data"].update({"7.mlp.post_act": torch.tensor([1])}), "this model has 1 layer)"),
    (lambda p: p["circuit_data"].update({"0.attn.y": torch.tensor([1])}), "is not a site of this model"),
    (lambda p: p["circuit_data"].update({"final_resid": torch.tensor([0.5])}), "not a list of channel indices"),
])
def test_a_viz_file_for_another_model_is_one_clear_line(setup, change, message):
    payload = viz_payload(setup["kept"], setup["config"])
    change(payload)
    viz = write_viz(setup["root"], payload, "bad/bracket_brace")
    code, out, err = cli("import-viz", viz, "--model", setup["model"], "-o", setup["root"] / "bad.cir")
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (setup["root"] / "bad.cir").exists()


def test_a_viz_file_with_arbitrary_objects_is_refused(setup, tmp_path):
    import argparse  # any class: weights_only=True refuses to build it
    path = tmp_path / "viz_data.pt"
    torch.save({"circuit_data": {}, "evil": argparse.Namespace(x=1)}, path)
    code, _, err = cli("import-viz", path, "--model", setup["model"], "-o", tmp_path / "x.cir", "--task", "brackets")
    assert code == 2 and "cannot read viz file" in err and err.count("\n") == 1
    torch.save({"something": 1}, path)
    code, _, err = cli("import-viz", path, "--model", setup["model"], "-o", tmp_path / "x.cir", "--task", "brackets")
    assert code == 2 and "not an OpenAI viz_data.pt file" in err


def test_a_path_that_names_no_task_needs_one(setup, tmp_path):
    path = tmp_path / "viz_data.pt"
    torch.save(viz_payload(setup["kept"], setup["config"]), path)
    code, _, err = cli("import-viz", path, "--model", setup["model"], "-o", tmp_path / "x.cir")
    assert code == 2 and "give --task or --task-file" in err


def test_the_whole_openai_workflow_on_a_release_directory(setup, tmp_path):
    """A model in OpenAI's release layout (config JSON with every field, flash=False masks): load it,
    extract a task, import OpenAI's circuit for it, diff the two."""
    from test_openai_checkpoint import openai_config_json, write_openai_release

    loaded = load_model(setup["model"])
    release = tmp_path / "csp_tiny"
    write_openai_release(release, loaded.model, openai_config_json(loaded.config))
    ours = tmp_path / "ours.cir"
    pipeline = PIPELINE % setup["target"]
    code, _, err = cli("extract", release, "--task", "bracket_brace", "-o", ours, "--pipeline", pipeline)
    assert code == 0, err
    extracted = parse(ours.read_text(), str(ours))
    kept: dict[str, list[int]] = {}
    for node in extracted.kept_nodes():
        kept.setdefault(node.site, []).append(node.index)
    viz = write_viz(tmp_path, viz_payload(kept, openai_config_json(loaded.config)))
    theirs = tmp_path / "openai.cir"
    code, _, err = cli("import-viz", viz, "--model", release, "-o", theirs, "--mean-tokens", "4096")
    assert code == 0, err
    code, stdout, err = cli("diff", theirs, ours, "--model", release, "--task", "bracket_brace", "-n", "32", "--json")
    assert code in (0, 1), err
    diff = json.loads(stdout)
    assert diff["structural"]["nodes"]["added"] == diff["structural"]["nodes"]["removed"] == []
    assert diff["behavioural"]["n"] == 32
    assert parse(theirs.read_text(), str(theirs)).header["source"]["file"] == "final_model.pt"


def device_commands(setup, out):
    """Every command (besides train, eval, extract and check) that runs a model, writing to ``out``."""
    viz = write_viz(setup["root"], viz_payload(setup["kept"], setup["config"]), "device/bracket_brace")
    model, ours = setup["model"], setup["ours"]
    return {
        "import-viz": ["import-viz", viz, "--model", model, "-o", out / "c.cir", "--mean-tokens", 4096],
        "export --model": ["export", ours, "--model", model, "--task", "bracket_brace", "-n", 16, "-o", out / "g.json"],
        "export a model": ["export", model, "--format", "safetensors", "-o", out / "m.safetensors"],
        "explain": ["explain", ours, "--model", model, "--windows", 8, "--prompts", 16, "-o", out / "e.cir"],
        "report": ["report", ours, "--model", model, "-o", out / "r.html", "--no-check", "--windows", 8,
                   "--prompts", 16],
    }


def test_commands_that_run_a_model_take_device(setup, tmp_path):
    for name, argv in device_commands(setup, tmp_path).items():
        code, _, err = cli(*argv, "--device", "cpu")
        assert code == 0, (name, err)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["c.cir", "e.cir", "g.json", "m.safetensors", "r.html"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line_before_any_work(setup, tmp_path):
    refused_on_cuda(device_commands(setup, tmp_path))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- OpenAI's layout with a BPE tokenizer

@pytest.fixture(scope="module")
def bpe_release(tmp_path_factory):
    """The shipped sparse model (bytes, it does single_double_quote) as an OpenAI release whose config names
    tinypython_2k, with a small data-gym BPE beside nothing: the tokenizer is its own directory.

    The BPE numbers bytes in GPT-2's order, not by value ('"' is token 1, "'" token 6), so each of the
    release's token rows (embedding, unembedding, logit bias) is the byte model's row of the token's first
    byte: the model only does the task when prompts and answers are encoded by the BPE, merges and all."""
    import dataclasses
    from pathlib import Path

    from test_openai_checkpoint import openai_config_json, write_bpe, write_openai_release

    from circuitir.models.gpt import SparseGPT

    root = tmp_path_factory.mktemp("bpe")
    ids = write_bpe(root / "tok")
    byte_model = load_model(Path(__file__).parent.parent / "models" / "sparse.pt")
    config = dataclasses.replace(byte_model.config, vocab_size=len(ids) + 1)
    first_byte = torch.tensor([token[0] for token in sorted(ids, key=ids.get)] + [0])  # <|endoftext|>: byte 0
    rows = ("transformer.wte.weight", "lm_head.weight", "final_logits_bias")
    state = {k: v[first_byte].clone() if k in rows else v for k, v in byte_model.model.state_dict().items()}
    model = SparseGPT(config).eval()
    model.load_state_dict(state)
    write_openai_release(root / "csp_bpe", model, openai_config_json(config))
    return {"root": root, "release": root / "csp_bpe", "tok": root / "tok", "config": config, "ids": ids}


BPE_PIPELINE = ("trace, mean-ablate{tokens=2048}, prune{target=0.4,steps=30,prompts=32,select=32,greedy=false}, "
                "lower, fold-constants, dce")


def test_the_openai_workflow_with_a_bpe_tokenizer(bpe_release):
    """extract single_double_quote from a release in OpenAI's layout with a tinypython_2k-style BPE, import
    OpenAI's circuit (viz_data.pt) for the same model and task, diff the two: the same circuit is equal,
    one with a node fewer is not."""
    from test_openai_checkpoint import openai_config_json

    root, release, tok, ids = bpe_release["root"], bpe_release["release"], bpe_release["tok"], bpe_release["ids"]
    code, stdout, err = cli("eval", release, "--task", "single_double_quote", "--tokenizer", tok, "-n", 128, "--json")
    assert code == 0, err
    assert json.loads(stdout)["loss"] < 0.3  # learnt, through the BPE (chance is 0.69)

    ours = root / "ours.cir"
    code, stdout, err = cli("extract", release, "--task", "single_double_quote", "--tokenizer", tok, "-o", ours,
                            "--pipeline", BPE_PIPELINE, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["loss"] <= 0.4 and summary["nodes"] > 0
    extracted = parse(ours.read_text(), str(ours))
    spec = extracted.header["source"]["tokenizer"]
    assert spec["kind"] == "data_gym" and spec["name"] == "tinypython_2k" and len(spec["sha256"]) == 64
    assert extracted.header["source"]["file"] == "final_model.pt"
    assert extracted.header["task"]["candidates"] == "'\"' \"'\""
    assert sorted(extracted.candidates) == sorted([ids[b'"'], ids[b"'"]]) == [1, 6]  # BPE ids, not bytes 34, 39
    assert extracted.n_nodes == summary["nodes"] and extracted.n_edges == summary["edges"]

    kept: dict[str, list[int]] = {}
    for node in extracted.kept_nodes():
        kept.setdefault(node.site, []).append(node.index)
    raw_config = openai_config_json(bpe_release["config"])
    viz = write_viz(root, viz_payload(kept, raw_config), "single_double_quote")
    theirs = root / "openai.cir"
    code, stdout, err = cli("import-viz", viz, "--model", release, "--tokenizer", tok, "-o", theirs,
                            "--mean-tokens", 2048, "--json")
    assert code == 0, err
    imported_summary = json.loads(stdout)
    imported = parse(theirs.read_text(), str(theirs))
    assert imported_summary["dropped_nodes"] == 0
    assert imported.kept_nodes() == extracted.kept_nodes()
    assert (imported.n_nodes, imported.n_edges) == (extracted.n_nodes, extracted.n_edges)
    assert imported.header["source"]["tokenizer"] == spec and imported.header["task"]["name"] == "single_double_quote"
    assert imported_summary["loss"] == pytest.approx(summary["loss"], abs=1e-5)

    code, stdout, err = cli("diff", theirs, ours, "--model", release, "--tokenizer", tok, "--task",
                            "single_double_quote", "-n", 32, "--ignore-header", "--json")
    assert code == 0, err
    diff = json.loads(stdout)
    assert diff["equal"] and diff["structural"]["equal"]
    assert diff["behavioural"]["n"] == 32 and diff["behavioural"]["predictions_differ"] == 0
    assert diff["behavioural"]["max_abs_logit_diff"] == 0.0
    assert diff["behavioural"]["a"] == diff["behavioural"]["b"]
    # Headers differ (OpenAI's losses against extract's metrics), so without --ignore-header they are not equal.
    code, stdout, err = cli("diff", theirs, ours, "--json")
    assert code == 1 and {row["key"] for row in json.loads(stdout)["structural"]["header"]} >= {
        "openai.loss", "metrics.target_loss", "pipeline"}

    # OpenAI's circuit without one of the final residual channels: that node is mean-ablated there.
    site = "final_resid"
    dropped = max(kept[site])
    fewer = {**kept, site: [i for i in kept[site] if i != dropped]}
    viz = write_viz(root, viz_payload(fewer, raw_config), "fewer/single_double_quote")
    smaller = root / "openai-fewer.cir"
    code, _, err = cli("import-viz", viz, "--model", release, "--tokenizer", tok, "-o", smaller,
                       "--mean-tokens", 2048)
    assert code == 0, err
    assert parse(smaller.read_text(), str(smaller)).n_nodes == extracted.n_nodes - 1
    code, stdout, err = cli("diff", ours, smaller, "--model", release, "--tokenizer", tok, "--task",
                            "single_double_quote", "-n", 32, "--ignore-header", "--json")
    assert code == 1, err
    diff = json.loads(stdout)
    nodes = diff["structural"]["nodes"]
    assert nodes["changed"] == [{"node": f"{site}[{dropped}]", "attribute": "kind", "a": "kept", "b": "const"}]
    assert nodes["added"] == nodes["removed"] == [] and not diff["equal"]
    assert diff["behavioural"]["max_abs_logit_diff"] > 0
