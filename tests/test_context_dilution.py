"""benchmarks/context_dilution.py on a hand-made bracket counter whose depth signal is exactly an average.

The model: every token writes residual channel 1, `[` also channel 0; one attention head with zero
query and key (uniform attention over the prefix) reads channel 0 and writes the fraction of `[`
tokens, times a constant, to channel 2; the unembedding says `]` when channel 2 is above a threshold.
So its depth signal is 2 * (number of `[`) / n, the mechanism the paper finds in the bracket circuit, and
the benchmark must find channel 2 as the depth channel, fit its nested-minus-flat gap as b/n, and see
nested lists read as flat beyond a length. The circuit is the same model with nothing ablated, so it
must agree with the model to float precision: a check of how the script reads the compiled circuit.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import load_benchmark, tiny_config
from circuitir.ir.circuit import Circuit
from circuitir.ir.trace import trace
from circuitir.models.checkpoint import LoadedModel
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import ByteTokenizer

OPEN, CLOSE, NEWLINE = ord("["), ord("]"), ord("\n")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("context_dilution")


def averaging_bracket_model() -> SparseGPT:
    model = SparseGPT(tiny_config(block_size=64, n_layer=1))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.fill_(1.0)
        wte = model.transformer.wte.weight
        wte[:, 1] = 1.0
        wte[OPEN, 0] = 1.0
        attn = model.transformer.h[0].attn
        width = attn.c_proj.weight.shape[1]
        attn.c_attn.weight[2 * width + 0, 0] = 1.0   # v channel 0 of head 0 reads residual channel 0
        attn.c_proj.weight[2, 0] = 1.0                # and is written to residual channel 2
        model.lm_head.weight[CLOSE, 2] = 40.0         # `]` when the bracket fraction is high
        model.lm_head.weight[NEWLINE, 1] = 6.0        # a newline otherwise: the threshold is 6/40
    return model.eval()


@pytest.fixture(scope="module")
def measured(bench):
    torch.manual_seed(0)
    model = averaging_bracket_model()
    loaded = LoadedModel(model, ByteTokenizer(), sha256="", path="hand-made")
    everything = {name: torch.ones(site.width, dtype=torch.bool) for name, site in trace(model).sites.items()}
    circuit = Circuit.from_mask(model, everything, ablation="zero", candidates=[NEWLINE, CLOSE])
    return bench.run(loaded, loaded, circuit, pairs_per_step=3, distractor_pairs=8, depth_prompts=64, buckets=8)


def test_depth_channel_is_found_in_the_circuit(measured):
    depth = measured["depth"]
    assert depth["node"] == "0.attn.resid_delta[2]"
    # nested prompts have about twice the `[` fraction of their flat partners (spread by their lengths)
    assert depth["d"] > 0.5
    assert all(other["d"] == 0 for other in depth["attention_writes"][1:])


def test_circuit_reads_as_the_model(measured):
    for sweep in ("list", "context"):
        prompts = measured["sweeps"][sweep]["prompts"]
        np.testing.assert_allclose(prompts["circuit"], prompts["sparse"], atol=1e-4)
        np.testing.assert_allclose(prompts["depth_circuit"], prompts["depth_model"], atol=1e-5)


def test_gap_falls_as_one_over_length(measured):
    fit = measured["sweeps"]["list"]["summary"]["fit_gap_circuit"]
    # gap = 4/n - 2/(n - 1) for a nested prompt of n tokens: b/n with b near 2 and a near 0
    assert fit["inverse"]["r2"] > 0.95
    assert fit["inverse"]["r2"] > fit["linear"]["r2"] + 0.05
    assert 1.5 < fit["inverse"]["b"] < 2.5 and abs(fit["inverse"]["a"]) < 0.01


def test_long_nested_lists_read_as_flat(measured):
    # With the threshold at 0.15, a flat list (2/n) reads as flat beyond 13 tokens and a nested one (4/n)
    # as nested below 27: both right in the bucket (16,24], nested wrong from 27 tokens on.
    assert measured["block_size"] == 64 and measured["bucket_width"] == 8
    table = {row["lo"]: row for row in measured["sweeps"]["list"]["table"]}
    assert max(table) == 56
    assert table[16]["nested"]["circuit"] > 0.9 and table[16]["flat"]["circuit"] > 0.9
    assert all(table[lo]["nested"]["circuit"] < 0.1 for lo in (32, 40, 48, 56))
    assert all(table[lo]["flat"]["circuit"] > 0.9 for lo in table if lo >= 16)
    nested = measured["sweeps"]["list"]["summary"]["behaviour"]["nested"]["circuit"]
    assert nested["status"] == "fails" and nested["onset"][0] in (16, 24)
    # the circuit is the model: every behaviour is predicted
    assert all(measured["verdict"]["matches"].values())
    assert measured["verdict"]["headline"].startswith("the circuit predicts 10 of 10")
