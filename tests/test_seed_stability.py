"""benchmarks/seed_stability.py: the overlap arithmetic on known sets, and a --quick run on a tiny model.

The model is conftest's ``bracket_model`` (trained once per session to do bracket_brace); the run extracts
it under three seeds with the script's short pipeline, writes each circuit, and must read them back on a
second run instead of extracting again, and refuse files made with another target.
"""

from __future__ import annotations

import json

import pytest

import circuitir as cir
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("seed_stability")


def test_jaccard_and_overlap_on_known_sets(bench):
    assert bench.jaccard({1, 2}, {2, 3}) == 1 / 3
    assert bench.jaccard(set(), set()) == 1.0 and bench.jaccard({1}, set()) == 0.0
    found = bench.overlap({0: {"a", "b", "c"}, 1: {"b", "c", "d"}, 2: {"c", "d", "e", "f"}})
    assert found["pairs"] == {"0-1": 2 / 4, "0-2": 1 / 6, "1-2": 2 / 5}
    assert found["mean"] == pytest.approx((1 / 2 + 1 / 6 + 2 / 5) / 3, abs=1e-15)
    assert (found["min"], found["max"]) == (1 / 6, 1 / 2)
    assert found["common"] == ["c"] and found["union"] == 6
    assert found["frequency"] == {1: 3, 2: 2, 3: 1}  # a, e, f in one set; b, d in two; c in all three
    one = bench.overlap({4: {"x"}})
    assert one["mean"] is None and one["common"] == ["x"] and one["frequency"] == {1: 1}
    assert bench.chance_jaccard(10, 10, 100) == pytest.approx(1 / 19)  # E|A ∩ B| = 1, |A ∪ B| = 19
    assert bench.spread([2, 4, 6]) == {"mean": 4, "sd": 2, "min": 2, "max": 6, "max_over_min": 3}
    assert bench.parse_seeds("3") == [0, 1, 2] and bench.parse_seeds("0,3,7") == [0, 3, 7]
    for bad in ("0,0", "x", "-1,2", "0"):
        with pytest.raises(cir.UserError):
            bench.parse_seeds(bad)


def test_quick_run_end_to_end_and_resumed(bench, bracket_model, tmp_path, capsys):
    path, metrics = bracket_model
    target = round(metrics["tasks"]["bracket_brace"]["loss"] + 0.2, 2)
    argv = ["--model", str(path), "--task", "bracket_brace", "--quick", "--target", str(target),
            "--out-dir", str(tmp_path / "circuits")]
    assert bench.main(argv + ["--json", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["seeds"] == [0, 1, 2] and "prune{target=%s" % target in first["pipeline"]
    for seed in ("0", "1", "2"):
        row = first["per_seed"][seed]
        circuit = cir.load(tmp_path / "circuits" / f"seed{seed}.cir")
        assert circuit.provenance.seed == int(seed) and not row["cached"]
        assert (row["nodes"], row["edges"], row["loss"]) == (circuit.n_nodes, circuit.n_edges, circuit.claims.loss)
    nodes = {seed: {str(n) for n in cir.load(tmp_path / "circuits" / f"seed{seed}.cir").kept_nodes()}
             for seed in (0, 1, 2)}
    assert first["nodes"]["pairs"]["0-1"] == bench.jaccard(nodes[0], nodes[1])
    assert first["nodes"]["common"] == sorted(nodes[0] & nodes[1] & nodes[2])
    assert first["spread"]["nodes"]["min"] == min(len(s) for s in nodes.values())
    # a second run reads every circuit back and reports the same figures
    assert bench.main(argv + ["--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert all(row["cached"] for row in again["per_seed"].values())
    for key in ("per_seed", "spread", "nodes", "edges"):
        if key == "per_seed":
            for row in (*first[key].values(), *again[key].values()):
                row.pop("cached")
        assert again[key] == first[key]
    assert "Jaccard of the node sets over 3 pairs" in capsys.readouterr().out
    # circuits written for another target are not silently reused
    assert bench.main(argv[:-4] + ["--target", str(target + 0.05), "--out-dir", str(tmp_path / "circuits")]) == 2
    assert "another pipeline" in capsys.readouterr().err
