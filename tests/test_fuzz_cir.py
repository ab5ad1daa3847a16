"""The .cir fuzzing campaign (tests/fuzz_cir.py): no traceback, hang or blow-up on any malformed circuit.

The default run tries a few thousand mutated examples and a few hundred hypothesis circuits (valid
ones, and well-formed ones made wrong); ``pytest -m fuzz`` runs the long campaign (100,000 mutated
files). Every case must end in a located CirSyntaxError, or compile and run (see ``run_case``).
A failure found here becomes a named case in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitir.grammar import emit

from cir_strategies import circuits
from fuzz_cir import SEMANTIC, campaign, run_case


def assert_clean(result) -> None:
    assert result.counts["rejected"] > 0 and result.counts["ran"] > 0  # the campaign exercised both outcomes
    assert not result.failures, result.summary() + "\n" + "\n".join(result.failures)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_examples(seed):
    assert_clean(campaign(300, seed=1000 + seed))


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", range(20))
def test_mutated_examples_long(seed):
    assert_clean(campaign(5000, seed=2000 + seed))


SLOW = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=60, **SLOW)
@given(circuits())
def test_a_valid_circuit_parses_compiles_and_runs(circuit):
    outcome = run_case(emit(circuit))
    assert outcome.kind == "ran", outcome.detail


@settings(max_examples=120, **SLOW)
@given(circuits(), st.data())
def test_a_well_formed_but_wrong_circuit_is_refused_or_runs(circuit, data):
    text = emit(circuit)
    for _ in range(data.draw(st.integers(1, 3))):
        pattern, choices = data.draw(st.sampled_from(SEMANTIC))
        matches = list(re.finditer(pattern, text))
        if matches:
            m = data.draw(st.sampled_from(matches))
            text = text[:m.end(1)] + data.draw(st.sampled_from(choices)) + text[m.end():]
    outcome = run_case(text)
    assert outcome.kind in ("rejected", "ran"), outcome.detail
