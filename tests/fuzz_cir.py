"""A mutation fuzzer for .cir text: damage the shipped examples, then demand a clean outcome.

Each case is one mutated file. The outcome must be one of:

* **rejected**: ``parse`` raises :class:`CirSyntaxError` whose report is ``file:line:col: message``, the
  line, and a caret;
* **accepted**: ``parse`` returns a circuit; then ``emit`` writes it, ``compile_circuit`` compiles it, and a
  forward on a few token sequences returns logits of the right shape, finite unless the circuit itself
  holds a non-finite or overflowing number (a circuit may legitimately say ``bias=nan``); ``run_prompts``
  returns rows or raises :class:`UserError` (a prompt outside the vocabulary, say).

Anything else is a failure: another exception, a case over ``TIME_LIMIT`` seconds. Used by
``tests/test_fuzz_cir.py`` (a few thousand cases by default, 100,000+ under ``-m fuzz``) and as a script
for a long campaign::

    PYTHONPATH=. python tests/fuzz_cir.py --cases 200000 --seed 1 [--save-failures DIR]

which prints the figures (cases, rejected, accepted, accepted and ran, failures, slowest case, peak RSS).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import resource
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from circuitir.errors import UserError
from circuitir.grammar import CirSyntaxError, emit, format_text, parse

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.cir"))
TIME_LIMIT = 5.0
HUGE = 1e6  # beyond this magnitude, or with a non-finite value in it, a circuit may overflow to inf/nan

NUMBERS = ["0", "-1", "1", "-0.0", "nan", "inf", "-inf", "1e39", "3.4028235e38", "1e-45", "100000",
           "300000000", "100000000000", "4294967296", "9" * 50, "9" * 5000, "1" + "0" * 400, "0.5", "2", "7",
           "1.5", "-7", "65537", "1e308", "1e-320", "+1", ".5", "5."]
TOKENS = ["{", "}", "[", "]", "=", ",", ":", "<-", "#", '"', "\\", "f32\"", "head", "norm", "const", "layer",
          "final:", "embed", "bigram", "candidates", "circuitir", "rms", "layernorm", "attn", "mlp", "\t", "\r",
          "é", "\u2028", "\x00", "\ufeff", "𝟘", "null", "true", "{}", "[]", "logits[0]", "final_resid[0]"]
SEMANTIC = [
    # (pattern, replacements): a well-formed edit that is wrong in meaning
    (r"(vocab_size = )\d+", ["0", "1", "2", "300000000", "100000000000", "-5", "1.5", '"256"', "true", "null"]),
    (r"(n_layer = )\d+", ["0", "2", "100000", "257", "-1", "1.0", '"1"']),
    (r"(d_model = )\d+", ["1", "3", "65537", "1048576", "0"]),
    (r"(d_mlp = )\d+", ["1", "100000", "0"]),
    (r"(n_head = )\d+", ["1", "3", "70000"]),
    (r"(d_head = )\d+", ["1", "3", "70000", "0"]),
    (r"(block_size = )\d+", ["0", "1", "-1", "nan", '"x"', "1e9", "2000000"]),
    (r"(activation_type = )\S+", ['"tanh"', "1", "null", '"relu"', '"gelu"']),
    (r"(afrac = )\S+", ["0.25", "0", "1.5", "nan", "inf", "1", "-0.5", '"x"', "[0.5]", "1e-9"]),
    (r"(afrac_loctypes = )\S+", ['"mlp_neuron"', '"attn_q,attn_k,attn_v,mlp_neuron"', '"nowhere"', "3", "null",
                                 '""', '"attn_in,attn_out,mlp_in,mlp_out,attn_q,attn_k,attn_v,mlp_neuron"']),
    (r"(rms_norm = )\S+", ["1", '"yes"', "null"]),
    (r"(d_pos_emb = )\S+", ["3", "8", "1.5"]),
    (r"(  norm = )\S+", ['"frozen"', '"live"', '"other"', "1", "null", "[]"]),
    (r"(  task = )\S+", ["3", "[]", "{}", "null"]),
    (r"(  ablation = )\S+", ["3", "[1]", '"weird"']),
    (r"(source\.tokenizer = ).*", ["3", "[]", "{}", "null", '"bytes"', "true"]),
    (r"(source\.tokenizer\.kind = ).*", ['"tiktoken"', '"bpe"', "3", "null", '"data_gym"',
                                         '"data_gym"\n  source.tokenizer.dir = "/nonexistent"\n  source.tokenizer.name = "x"',
                                         '"data_gym"\n  source.tokenizer.dir = 3']),
    (r"(metrics\.loss = )\S+", ['"x"', "nan", "-1", "inf", "null"]),
    (r"(calibration\.scale = )\S+", ['"x"', "nan", "inf", "[1.0]", "null", "true", "2", "1e308"]),
    (r"(calibration\.shift = )\S+", ['"x"', "nan", "-inf", "null"]),
    (r"(seed = )\S+", ['"x"', "1.5", "null", "-1"]),
    (r"(metrics\.target_loss = )\S+", ['"x"', "nan", "-1", "inf"]),
    (r"(ablation\.tokens = )\S+", ["0", '"x"', "1e9", "-5"]),
    (r"(eps=)\S+", ["0.0", "-1.0", "nan", "inf", "1e-45", "1e30"]),
    (r"(width=)\S+", ["0", "1", "1000000000000", "1.5", "-1"]),
    (r"(frozen=)\S+", ["0.0", "nan", "inf", "-1.0", "1e30"]),
    (r"(sink=)\S+", ["nan", "inf", "-inf", "1e30"]),
    (r"(gain=)\S+", ["nan", "inf", "0.0", "1e30"]),
    (r"(bias=)\S+", ["nan", "inf", "-inf", "1e38"]),
    (r"(head )\d+", ["0", "1", "2", "3", "99", "100000000000"]),
    (r"(candidates)( \d+)+", ["", " 0", " 255", " 256", " 1 1 1", " 99999999999"]),
    (r"(embed )\d+", ["0", "1", "7", "8", "99", "100000"]),
    (r"(layer )\d+", ["0", "1", "2", "99"]),
    (r"(\[)\d+(?=\])", ["0", "1", "3", "4", "7", "8", "16", "99", "4294967296"]),
    (r"(<- \S+ )\S+", ["0.0", "nan", "inf", "1e38", "-1e38", "1e39"]),
    (r"(norm )(final|\d+\.(attn|mlp))", ["final", "0.attn", "0.mlp", "1.attn", "final2"]),
    (r"(const \S+ = )\S+", ["nan", "inf", "1e38"]),
]


def mutate(text: str, rng: random.Random) -> str:
    """One to three random mutations of ``text``."""
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        text = rng.choice(OPERATORS)(text, rng)
    return text


def _lines(text):
    return text.split("\n")


def op_byte_flip(text, rng):
    data = bytearray(text.encode("utf-8"))
    for _ in range(rng.randint(1, 4)):
        if data:
            i = rng.randrange(len(data))
            data[i] = (data[i] ^ (1 << rng.randrange(7))) or 32
    return data.decode("utf-8", errors="replace")


def op_delete_line(text, rng):
    lines = _lines(text)
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def op_duplicate_line(text, rng):
    lines = _lines(text)
    i = rng.randrange(len(lines))
    lines.insert(i, lines[i])
    return "\n".join(lines)


def op_move_line(text, rng):
    lines = _lines(text)
    line = lines.pop(rng.randrange(len(lines)))
    lines.insert(rng.randrange(len(lines) + 1), line)
    return "\n".join(lines)


def op_truncate(text, rng):
    return text[:rng.randrange(len(text) + 1)]


def op_number(text, rng):
    spans = [m.span() for m in re.finditer(r"(?<![\w.\[])[+-]?\d+(\.\d*)?(e[+-]?\d+)?", text)]
    if not spans:
        return text
    start, end = rng.choice(spans)
    return text[:start] + rng.choice(NUMBERS) + text[end:]


def op_token(text, rng):
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(TOKENS) + text[i:]


def op_crlf(text, rng):
    return text.replace("\n", "\r\n") if rng.random() < 0.5 else text.replace("\n", "\r")


def op_long_line(text, rng):
    lines = _lines(text)
    i = rng.randrange(len(lines))
    filler = rng.choice(["x" * 20000, " " * 20000, "# " + "c" * 20000, "1" * 20000, "[" * 5000, "a." * 5000])
    lines.insert(i, filler if rng.random() < 0.5 else lines[i] + filler)
    return "\n".join(lines)


def op_semantic(text, rng):
    pattern, choices = rng.choice(SEMANTIC)
    matches = list(re.finditer(pattern, text))
    if not matches:
        return text
    m = rng.choice(matches)
    return text[:m.end(1)] + rng.choice(choices) + text[m.end():]


def op_deep(text, rng):
    """Settings that nest deep, keys of many parts, many settings, huge lists."""
    kind = rng.randrange(4)
    if kind == 0:
        depth = rng.choice([15, 16, 17, 50, 3000])
        line = "  deep = " + "[" * depth + "1" + "]" * depth
    elif kind == 1:
        line = "  " + ".".join(["k"] * rng.choice([15, 16, 17, 300, 20000])) + " = 1"
    elif kind == 2:
        line = "\n".join(f"  s{i} = {i}" for i in range(rng.choice([100, 3000])))
    else:
        line = "  big = [" + ", ".join(["1"] * rng.choice([10, 10000])) + "]"
    return text.replace("config:\n", "config:\n" + line + "\n", 1) if rng.random() < 0.5 else \
        text.replace("header:\n", "header:\n" + line + "\n", 1)


def op_unicode(text, rng):
    i = rng.randrange(len(text) + 1)
    return text[:i] + rng.choice(["é", "\u00a0", "\u200b", "😀", "\ud7ff", "Ω", "\u0085", "\x0c", "\x0b"]) + text[i:]


OPERATORS = [op_byte_flip, op_delete_line, op_duplicate_line, op_move_line, op_truncate, op_number, op_number,
             op_token, op_crlf, op_long_line, op_semantic, op_semantic, op_semantic, op_semantic, op_deep,
             op_unicode]


# ---------------------------------------------------------------- the oracle

class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


@dataclass
class Outcome:
    kind: str                 # "rejected", "ran", "failure"
    detail: str = ""
    seconds: float = 0.0


def may_overflow(circuit) -> bool:
    """Whether the circuit's own numbers may make its logits non-finite: a non-finite or huge number, or
    a non-positive eps. (A live norm whose per-token tables would make its variance negative stays
    finite: compile clamps the variance at 0.)"""
    values = [w for w in circuit.edges.values()]
    for data in circuit.nodes.values():
        values += [data.bias, data.value, data.gain, data.shift]
    for norm in circuit.norms.values():
        values += [norm.eps, norm.frozen_scale or 0.0]
        if norm.eps <= 0 or norm.eps > HUGE or norm.width < 1:
            return True
        for table in (norm.passive_sq, norm.passive_sum):
            if table is not None:
                values += [float(table.abs().max())] if table.numel() else []
    values += [s for s in circuit.heads.values() if s is not None]
    for table in list(circuit.embed.values()) + ([circuit.bigram] if circuit.bigram is not None else []):
        if table.numel():
            values.append(float(table.abs().max()))
    calibration = circuit.header.get("calibration", {})
    values += [calibration.get("scale", 1.0), calibration.get("shift", 0.0)]
    return any(not math.isfinite(v) or abs(v) > HUGE for v in values)


def check_report(exc: CirSyntaxError, text: str, filename: str) -> None:
    report = str(exc).split("\n")
    assert report[0].startswith(f"{filename}:{exc.line}:{exc.column}: "), report[0][:200]
    assert report[1] == text.split("\n")[exc.line - 1].rstrip("\r\n"), "the quoted line is not the line at fault"
    assert report[2].endswith("^") and len(report[2]) == exc.column, "the caret is not under the column"


def run_case(text: str, prompts=("a", "1 2 3"), filename: str = "fuzz.cir", with_format: bool = True) -> Outcome:
    """Parse, then (if accepted) emit, compile and run; any outcome but a clean one is a failure."""
    from circuitir.runtime.compile import compile_circuit
    from circuitir.runtime.run import run_prompts

    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        try:
            circuit = parse(text, filename)
        except CirSyntaxError as exc:
            check_report(exc, text, filename)
            return Outcome("rejected", exc.message[:80])
        if with_format:
            format_text(text, filename)
        emit(circuit)
        module = compile_circuit(circuit)
        vocab, block = circuit.config["vocab_size"], circuit.config["block_size"]
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (2, min(block, 6)), generator=generator)
        with torch.no_grad():
            logits = module(tokens)
        assert tuple(logits.shape) == (2, min(block, 6), len(circuit.candidates)), tuple(logits.shape)
        if not bool(torch.isfinite(logits).all()) and not may_overflow(circuit):
            raise AssertionError("non-finite logits from a circuit of finite, moderate numbers")
        for prompt in prompts:
            try:
                run_prompts(circuit, [prompt], module)
            except UserError:
                pass
        return Outcome("ran")
    except CaseTimeout:
        return Outcome("failure", f"over {TIME_LIMIT} s")
    except Exception as exc:  # noqa: BLE001 - the oracle: anything else is a failure
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return Outcome("failure", f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno} "
                                  f"({frame.name}): {str(exc)[:120]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        Outcome.last_seconds = time.perf_counter() - start


@dataclass
class Campaign:
    cases: int = 0
    counts: Counter = field(default_factory=Counter)
    failures: dict = field(default_factory=dict)  # detail -> first text
    slowest: float = 0.0
    save_to: Path | None = None

    def add(self, text: str, outcome: Outcome) -> None:
        self.cases += 1
        self.counts[outcome.kind] += 1
        self.slowest = max(self.slowest, Outcome.last_seconds)
        if outcome.kind == "failure" and outcome.detail not in self.failures:
            self.failures[outcome.detail] = text
            if self.save_to is not None:  # as found: a long campaign may be stopped early
                self.save_to.mkdir(parents=True, exist_ok=True)
                name = f"failure-{len(self.failures) - 1}.cir"
                (self.save_to / name).write_text(text, encoding="utf-8", errors="surrogatepass")
                print(f"FAILURE {len(self.failures) - 1} ({name}): {outcome.detail}", flush=True)

    def summary(self) -> str:
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        accepted = self.counts["ran"] + self.counts["failure"]
        return (f"cases {self.cases}: rejected with a located error {self.counts['rejected']}, accepted "
                f"{accepted}, accepted and ran {self.counts['ran']}, failures {self.counts['failure']} "
                f"({len(self.failures)} distinct); slowest case {self.slowest:.2f} s; peak RSS {rss_mb:.0f} MB")


def campaign(n: int, seed: int, progress_every: int = 0, save_to: Path | None = None) -> Campaign:
    """``n`` cases from ``seed``. The large extracted examples take a second each to parse, so they are drawn
    one time in 30; the hand-written ones (a hundredth of that) the rest of the time. Accepted files are
    formatted too one time in 10."""
    rng = random.Random(seed)
    small = [p.read_text() for p in EXAMPLES if p.stat().st_size < 20000]
    large = [p.read_text() for p in EXAMPLES if p.stat().st_size >= 20000]
    result = Campaign(save_to=save_to)
    for i in range(n):
        source = rng.choice(large if large and rng.random() < 1 / 30 else small)
        text = mutate(source, rng)
        result.add(text, run_case(text, with_format=rng.random() < 0.1))
        if progress_every and (i + 1) % progress_every == 0:
            print(result.summary(), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-failures", type=Path)
    args = parser.parse_args(argv)
    result = campaign(args.cases, args.seed, progress_every=max(1, min(args.cases // 20, 2000)),
                      save_to=args.save_failures)
    print(result.summary())
    for i, detail in enumerate(result.failures):
        print(f"FAILURE {i}: {detail}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
