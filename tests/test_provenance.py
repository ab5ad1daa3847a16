"""The typed views of a circuit's header (ir/provenance.py): what code reads instead of header keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from circuitir.grammar import CirSyntaxError, parse
from circuitir.ir.provenance import Ablation, Calibration, Claims, Provenance
from circuitir.runtime.compile import compile_circuit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_an_extracted_circuit_reads_as_typed_records():
    circuit = parse((EXAMPLES / "sparse-brackets.cir").read_text())
    p = circuit.provenance
    assert p.model_sha256 == "6ff2157cd79eb9196d7fce4e644d01ee9ce53b481ca3cb41098b7ce2435f808e"
    assert p.model_file == "sparse.pt"
    assert p.tokenizer == {"kind": "bytes"}
    assert p.task == "bracket_counting"
    assert p.task_spec["loss"] == "binary_ce_last_position"
    assert p.ablation == Ablation("mean", "pretrain", 65536,
                                  "eb6f8507a2fbce2fcd0acdaa50aa50d4ae58dac67b468f69bb04a88dc8d2cb93")
    assert p.pipeline.startswith("trace, mean-ablate{over=pretrain,tokens=65536}, prune{target=0.15,")
    assert p.seed == 0
    assert circuit.calibration == Calibration(1.0, 0.0) and circuit.calibration.is_identity
    assert circuit.claims == Claims(0.15, 0.13, 0.12183946371078491)
    assert circuit.norm_mode == "live"


def test_a_circuit_that_names_nothing_gets_the_defaults():
    circuit = parse((EXAMPLES / "bracket_toy.cir").read_text())
    circuit.header = {}
    assert circuit.provenance == Provenance()
    assert circuit.provenance.ablation.kind == "mean"
    assert circuit.calibration.is_identity
    assert circuit.claims == Claims(None, None, None)


def test_words_where_groups_may_stand():
    header = {"task": "brackets by hand", "ablation": "zero", "pipeline": ["trace", "lower"], "seed": 3}
    p = Provenance.of(header)
    assert (p.task, p.task_spec, p.ablation.kind, p.pipeline, p.seed) == ("brackets by hand", {}, "zero",
                                                                          "trace, lower", 3)
    assert Provenance.of({"ablation": "by hand"}).ablation == Ablation()  # not a kind: the default


def test_compile_applies_the_typed_calibration():
    text = (EXAMPLES / "bracket_toy.cir").read_text()
    plain = parse(text)
    scaled_text = text.replace("header:\n", "header:\n  calibration.scale = 2.0\n  calibration.shift = 0.5\n", 1)
    assert "calibration.scale = 2.0" in scaled_text
    scaled = parse(scaled_text)
    assert scaled.calibration == Calibration(2.0, 0.5)
    import torch
    tokens = torch.tensor([[1, 2, 3, 4]]) % plain.config["vocab_size"]
    a, b = compile_circuit(plain)(tokens), compile_circuit(scaled)(tokens)
    assert torch.allclose(b, 2.0 * a + 0.5)


@pytest.mark.parametrize("line, message", [
    ('metrics.loss = "low"', "header: metrics.loss must be a finite number >= 0, got 'low'"),
    ("calibration.scale = inf", "header: calibration.scale must be a finite number, got inf"),
    ("seed = 1.5", "header: seed must be a whole number, got 1.5"),
])
def test_fields_the_views_read_are_checked_at_parse_time(line, message):
    text = (EXAMPLES / "bracket_toy.cir").read_text().replace("header:\n", f"header:\n  {line}\n", 1)
    with pytest.raises(CirSyntaxError) as info:
        parse(text, "f.cir")
    assert str(info.value).startswith(f"f.cir:12:3: {message}\n")
