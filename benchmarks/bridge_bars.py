"""Bridge bars: the measured bars of issue 8.

1. Hybrid forwards: at every boundary, both hybrids' pretraining loss closer to
   the dense model's than the stand-alone sparse model's is (``bridge eval``).
2. Steering on single_double_quote: the quote-type channel, strength 0 -> 1,
   moves the dense model's probability of the other quote monotonically and by
   at least 0.3, while the random-direction baseline moves it by less than a
   third of that. The quote-type channel is found, not chosen by hand: among the
   quotes circuit's residual-read channels, the one that best separates a prompt
   from its contrast partner (``runtime/steer.py: contrast_channels``) at each
   boundary; the script steers along the best-scoring one, and along all the
   circuit's channels at that boundary. A third row, not a bar, steers along
   every sparse channel there: the most the bridge can carry (``steer --boundary``).
   ``--into residual`` puts the decoded change into the dense residual stream.
3. A circuit of the bridged sparse model passes ``check`` (``--quotes``, a quotes
   circuit of the bridged model; the shipped one is ``examples/bridged-quotes.cir``;
   ``--no-control`` leaves out check's controls, as ``circuitir check --no-control``).

    python benchmarks/bridge_bars.py [--bridged models/bridged.pt] [--dense models/dense.pt] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitir.api import load  # noqa: E402
from circuitir.errors import UserError  # noqa: E402
from circuitir.render.plots import write_results  # noqa: E402
from circuitir.runtime.steer import bridge_eval, circuit_reads, contrast_channels, steer, steering_label  # noqa: E402
from circuitir.tasks import get_task  # noqa: E402

TASK = "single_double_quote"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bridged", default="models/bridged.pt")
    parser.add_argument("--dense", default="models/dense.pt")
    parser.add_argument("--quotes", default="examples/bridged-quotes.cir", help="quotes circuit of the bridged model")
    parser.add_argument("-n", type=int, default=128, help="held-out prompts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--into", choices=("read", "residual"), default="read",
                        help="steer the dense read at the boundary or its residual stream (steer --into)")
    parser.add_argument("--skip-check", action="store_true", help="leave out bar 3")
    parser.add_argument("--no-control", action="store_true", help="bar 3 without check's controls (faster)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    circuit = load(args.quotes)  # before any work: a missing or malformed circuit stops it here
    out = {}

    print("== 1. hybrid forwards: pretraining loss (validation windows)")
    table = bridge_eval(args.bridged, args.dense, TASK, args.n)
    out["eval"] = table
    dense, sparse = table["dense"]["lm_loss"], table["sparse"]["lm_loss"]
    print(f"dense {dense:.4f}  sparse {sparse:.4f}  (|sparse - dense| = {abs(sparse - dense):.4f})")
    passed = True
    for row in table["boundaries"]:
        gaps = [abs(row[k] - dense) for k in ("lm_loss_d2s", "lm_loss_s2d")]
        ok = row["closer_d2s"] and row["closer_s2d"]
        passed &= ok
        print(f"  {row['boundary']:7s} d->s {row['lm_loss_d2s']:.4f} (gap {gaps[0]:.4f})  "
              f"s->d {row['lm_loss_s2d']:.4f} (gap {gaps[1]:.4f})  {'PASS' if ok else 'FAIL'}")
    out["bar1"] = passed
    print(f"bar 1: {'PASS' if passed else 'FAIL'}")

    print("== 2. steering the dense model along the quote-type channel")
    from circuitir.models.bridges import load_bridged
    loaded, _ = load_bridged(args.bridged)
    best = None
    for point, channels in circuit_reads(circuit, loaded.config).items():
        ranked = contrast_channels(loaded.model, get_task(TASK), point, channels)
        print(f"  {point:7s} best separating channels: "
              + ", ".join(f"{r['channel']} ({r['score']:.2f})" for r in ranked[:3]))
        if best is None or ranked[0]["score"] > best[1]["score"]:
            best = (point, ranked[0])
    point, top = best
    site = "final_resid" if point == "final" else f"{point}.act_in"
    node = f"{site}[{top['channel']}]"
    out["steer"] = {}
    # The bar is on the channel and the circuit; every channel at the boundary is the ceiling: how far the
    # bridge moves the dense model when the whole sparse read changes to the contrast partner's.
    steered = {"channel": (node, None, None, "bar 2 "), "circuit": (None, args.quotes, point, "bar 2 "),
               "every": (None, None, point, "ceiling, not a bar: ")}
    for label, (one, circuit_path, boundary, kind) in steered.items():
        result = steer(args.bridged, args.dense, TASK, one, [0, 0.25, 0.5, 0.75, 1], circuit_path, args.n,
                       boundary=boundary, into=args.into)
        out["steer"][label] = result
        b = [r["p_other"] for r in result["bridge"]]
        r = [x["p_other"] for x in result["random"]]
        move, rand = b[-1] - b[0], r[-1] - r[0]
        ok = result["bridge_monotonic"] and move >= 0.3 and abs(rand) < move / 3
        print(f"  {label:7s} {steering_label(result)}: "
              f"P(other) {' '.join(f'{x:.3f}' for x in b)}; random {' '.join(f'{x:.3f}' for x in r)}")
        print(f"    move {move:+.4f} (monotonic {result['bridge_monotonic']}), random {rand:+.4f}: "
              f"{kind}{'PASS' if ok else 'FAIL'}")
        out[f"bar2_{label}" if label != "every" else "ceiling_passes"] = ok

    if not args.skip_check:
        print("== 3. the bridged sparse model's quotes circuit passes check")
        from circuitir.api import check
        from circuitir.models.checkpoint import load_model
        report = check(circuit, load_model(args.bridged), control=not args.no_control)
        for claim in ("sufficiency", "necessity", "minimality", "faithfulness"):
            print(f"  {claim:12s} {'PASS' if report[claim]['passed'] else 'FAIL'}")
        print(f"bar 3: {'PASS' if report['passed'] else 'FAIL'}")
        out["bar3"] = report["passed"]
        out["check"] = report
    write_results(out, json_path=args.json, json_default=str)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:  # a missing or malformed input: one line, as the CLI says it
        print(f"bridge_bars: error: {exc}", file=sys.stderr)
        sys.exit(2)
