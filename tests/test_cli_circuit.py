"""The circuit commands' plain behaviour: trace, passes, run, and malformed .cir files for run/check/diff."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from circuitir.models.checkpoint import save_checkpoint
from circuitir.models.gpt import SparseGPT
from circuitir.models.sparsity import project_
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.passes import DEFAULT_PIPELINE, REGISTRY

from conftest import cli, randomize_, tiny_config

EXAMPLES = Path(__file__).parent.parent / "examples"
QUOTE_TOY = EXAMPLES / "quote_toy.cir"
GOLDEN_DCE = Path(__file__).parent / "golden" / "dce" / "one_layer.expected.cir"


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    """A random tiny checkpoint with a different density per matrix: (path, model)."""
    model = randomize_(SparseGPT(tiny_config()), seed=5)
    with torch.no_grad():
        for i, param in enumerate(model.sparse_parameters().values()):
            project_(param.data, [0.5, 0.25, 0.1, 0.05][i % 4])
    path = tmp_path_factory.mktemp("trace") / "sparse.pt"
    save_checkpoint(path, model, ByteTokenizer())
    return path, model


# ---------------------------------------------------------------- trace, passes

def test_trace_prints_every_site_with_its_width(sparse_model):
    path, model = sparse_model
    code, out, err = cli("trace", path)
    assert code == 0 and err == ""
    assert out.startswith("SparseGPT: 2 layers, d_model 8, 2 heads x 4, d_mlp 16, vocab 256, ")
    sites = model.sites()
    assert len(sites) == 2 * 8 + 1
    for name, site in sites.items():
        assert re.search(rf"^{re.escape(name)} +{site.width} ", out, re.M), name
    for name, param in model.sparse_parameters().items():
        nonzero = int((param != 0).sum())
        assert re.search(rf"^{re.escape(name)} +{nonzero} +{param.numel()} ", out, re.M), name


def test_trace_json_counts_are_the_models(sparse_model):
    path, model = sparse_model
    code, out, _ = cli("trace", path, "--json")
    assert code == 0
    info = json.loads(out)
    assert [(s["site"], s["channels"]) for s in info["sites"]] == [(n, s.width) for n, s in model.sites().items()]
    matrices = {row["matrix"]: row for row in info["matrices"]}
    assert set(matrices) == set(model.sparse_parameters())
    densities = set()
    for name, param in model.sparse_parameters().items():
        row = matrices[name]
        assert (row["nonzero"], row["total"]) == (int((param != 0).sum()), param.numel())
        assert row["density"] == row["nonzero"] / row["total"]
        densities.add(round(row["density"], 2))
    assert len(densities) >= 3  # the counts are per matrix, not one number repeated
    assert info["layers"] == 2 and info["config"]["d_mlp"] == 16
    site = {s["site"]: s for s in info["sites"]}
    assert site["1.mlp.post_act"]["read_by"] == ["transformer.h.1.mlp.c_proj.weight"]
    assert site["1.attn.act_in"]["written_by"][0] == "transformer.wte.weight"
    assert len(site["final_resid"]["written_by"]) == 1 + 2 * 2  # embedding, then every attn and mlp write


def test_passes_lists_every_registered_pass():
    code, out, _ = cli("passes")
    assert code == 0
    assert out.startswith(f"default pipeline: {DEFAULT_PIPELINE}\n")
    listed = [line.split(":")[0] for line in out.splitlines() if line and not line.startswith((" ", "default"))]
    assert listed == list(REGISTRY)
    assert "    target: float = 0.15" in out and "    tokens: int = 65536" in out
    code, out, _ = cli("passes", "--json")
    info = json.loads(out)
    assert info["default_pipeline"] == DEFAULT_PIPELINE
    assert [row["pass"] for row in info["passes"]] == list(REGISTRY)
    prune = next(row for row in info["passes"] if row["pass"] == "prune")
    assert prune["needs"] == ["graph", "ablation"] and prune["provides"] == ["mask"]
    assert prune["options"]["greedy"] == {"type": "bool", "default": True}


# ---------------------------------------------------------------- run

def expected_quote_logit(prompt: str) -> float:
    """quote_toy by hand: the head scores quote tokens 4 (= 4.0 * 2.0 / sqrt(4)) and others 0, so it puts
    e^4 / (e^4 + others) on the quote; the value is +1 for `"`, -1 for `'`; the unembedding is 3x."""
    others = len(prompt) - 1
    sign = 1.0 if '"' in prompt else -1.0
    return 3.0 * sign * math.exp(4) / (math.exp(4) + others)


@pytest.mark.parametrize("prompt, prediction", [('x = "hi', '"'), ("x = 'hi", "'"), ('print("hello world', '"')])
def test_run_quote_toy(prompt, prediction):
    code, out, err = cli("run", QUOTE_TOY, prompt, "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["prompt"] == prompt and row["prediction"] == prediction
    logit = expected_quote_logit(prompt)
    assert row["logits"] == {'"': pytest.approx(logit, abs=1e-5), "'": pytest.approx(-logit, abs=1e-5)}
    code, out, _ = cli("run", QUOTE_TOY, prompt)
    assert code == 0 and out.splitlines()[1].endswith(f"->  {prediction!r}")


def test_run_several_prompts():
    code, out, _ = cli("run", QUOTE_TOY, 'x = "a', "y = 'b", "--json")
    assert code == 0 and [row["prediction"] for row in json.loads(out)] == ['"', "'"]


@pytest.mark.parametrize("prompt, fragments", [
    ('x = "' + "a" * 70, ["is 75 tokens, longer than the model's context of 64", "shorten it"]),
    ("", ["an empty prompt has no last token"]),
])
def test_run_bad_prompt(prompt, fragments):
    code, out, err = cli("run", QUOTE_TOY, prompt)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("circuitir run: error: ")
    for fragment in fragments:
        assert fragment in err


def test_run_prompt_outside_the_circuits_vocabulary():
    """The golden circuit has a 24-token vocabulary: `h` (104) is not in it."""
    code, out, err = cli("run", GOLDEN_DCE, "hi")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "token 104 ('h'), outside the circuit's vocabulary of 24 tokens" in err
    code, out, _ = cli("run", GOLDEN_DCE, "\x01\x02\x17", "--json")
    assert code == 0 and json.loads(out)[0]["prediction"] == "\x02"


def test_check_needs_a_circuit_with_a_source(sparse_model):
    code, out, err = cli("check", QUOTE_TOY, sparse_model[0], "--no-control")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "has no source.sha256" in err


# ---------------------------------------------------------------- malformed files

MALFORMED = [
    # (text, line, column, message fragment)
    ("circuitir 1\n\nheader:\n  task = \"x\"\n\nconfig:\n  block_size = 8\n  vocab_size = oops\n", 8, 16,
     "unexpected `oops`"),
    ("circuitir 2\n", 1, 11, "version"),
    (QUOTE_TOY.read_text().replace("    <- final_resid[2] -3.0", "    <- final_resid[9] -3.0"), None, None,
     "final_resid[9]"),
]


@pytest.mark.parametrize("text, line, column, fragment", MALFORMED)
@pytest.mark.parametrize("command", ["run", "check", "diff"])
def test_malformed_file_gets_a_located_report(command, text, line, column, fragment, tmp_path, sparse_model):
    bad = tmp_path / "bad.cir"
    bad.write_text(text)
    argv = {"run": ["run", bad, "x = 'a"], "check": ["check", bad, sparse_model[0]],
            "diff": ["diff", QUOTE_TOY, bad]}[command]
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert "Traceback" not in err
    first, source_line, caret = err.splitlines()[:3]
    assert first.startswith(f"circuitir {command}: error: {bad}:")
    found_line, found_column = map(int, re.match(rf".*?{re.escape(str(bad))}:(\d+):(\d+): ", first).groups())
    if line is not None:
        assert (found_line, found_column) == (line, column)
    assert source_line == text.splitlines()[found_line - 1]
    assert caret == " " * (found_column - 1) + "^"
    assert fragment in err
