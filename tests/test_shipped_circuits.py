"""The circuits shipped in examples/, extracted from the shipped sparse model, against that model.

examples/sparse-brackets.cir and examples/sparse-quotes.cir are the output of
``circuitir extract models/sparse.pt --task brackets|quotes`` (default pipeline, seed 0). These
tests hold them to what ``check`` claims, on the real model rather than a toy: the compiled circuit
reproduces its header's held-out figures exactly, meets the 0.15 target, equals the model with every
other node mean-ablated to 1e-4, and the model without it loses the task. Per-node minimality and the
random-model control (minutes) run under ``pytest -m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from circuitir.grammar import parse
from circuitir.models.checkpoint import file_sha256, load_model
from circuitir.passes.ablate import declared_means
from circuitir.runtime.check import CHANCE, Checker, check
from circuitir.tasks import get_task

ROOT = Path(__file__).parent.parent
MODEL = ROOT / "models" / "sparse.pt"
SHIPPED = {"sparse-brackets.cir": "bracket_counting", "sparse-quotes.cir": "single_double_quote"}


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request, loaded):
    circuit = parse((ROOT / "examples" / request.param).read_text())
    checker = Checker(circuit, loaded, n=circuit.header["metrics"]["heldout_prompts"],
                      means=declared_means(loaded, circuit.provenance))
    return request.param, circuit, checker


def test_shipped_circuits_come_from_the_shipped_model(shipped):
    name, circuit, _ = shipped
    circuit.verify()
    assert circuit.header["source"]["sha256"] == file_sha256(MODEL)
    assert get_task(circuit.header["task"]["name"]).name == SHIPPED[name]
    assert circuit.header["metrics"]["target_loss"] == 0.15
    assert circuit.header["metrics"]["nodes"] == circuit.n_nodes
    assert circuit.header["metrics"]["edges"] == circuit.n_edges


def test_shipped_circuits_are_sufficient_and_match_their_header(shipped):
    _, circuit, checker = shipped
    result = checker.sufficiency()
    metrics = circuit.header["metrics"]
    assert result["passed"] and result["loss"] <= 0.15
    assert result["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    assert result["accuracy"] == metrics["accuracy"]


def test_shipped_circuits_are_the_ablated_model(shipped):
    _, _, checker = shipped
    result = checker.faithfulness()
    assert result["max_abs_logit_diff"] <= 1e-4 and result["passed"]
    assert result["declared_ablation"] == "mean" and result["ablations"]["mean"]["loss"] <= 0.15


def test_the_model_without_the_shipped_circuit_loses_the_task(shipped):
    _, _, checker = shipped
    result = checker.necessity(CHANCE / 2)
    assert result["passed"] and result["ablated_loss"] >= CHANCE / 2
    assert result["full_model_loss"] < 0.15


@pytest.mark.slow
def test_every_claim_of_check_holds_for_the_shipped_circuits(shipped, loaded):
    _, circuit, _ = shipped
    report = check(circuit, loaded, progress=False)
    assert all(report[claim]["passed"] for claim in ("sufficiency", "necessity", "minimality", "faithfulness"))
    assert report["faithfulness"]["control"]["reached_target"] is False
