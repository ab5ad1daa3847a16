"""What a .cir file may hold so that whatever parses also compiles and runs.

The grammar says how a file is spelled; :mod:`.parser` checks the circuit's
structure. This module holds the rest of the gate, in one place:

* the **limits** on sizes (``vocab_size``, ``n_layer``, widths, key depth,
  list nesting, number length, lines, tables) that keep a small file from
  making the runtime allocate without bound; they are checked before
  anything of that size is allocated;
* the **types and ranges** of the ``config`` fields and of the ``header``
  fields that compile, run, check, diff and render read.

Every check reports through ``fail(path, message)``, which the parser turns
into a ``file:line:col`` error at the setting the path names. The limits are
listed in docs/cir-language.md ("Limits").
"""

from __future__ import annotations

import math

from circuitir.grammar import values as V
from circuitir.models.config import ACTIVATION_SPARSITY_LOCATIONS

# ---------------------------------------------------------------- limits

MAX_VOCAB = 1 << 20           # tokens: a table is vocab_size float32 values
MAX_LAYERS = 256              # n_layer
MAX_WIDTH = 1 << 16           # d_model, d_mlp, n_head * d_head
MAX_BLOCK_SIZE = 1 << 20      # block_size (the longest prompt run accepts)
MAX_NORM_WIDTH = 1 << 40      # a norm's width= (the runtime divides by it)
MAX_ABLATION_TOKENS = 1 << 30  # ablation.tokens: corpus tokens the means are taken over
MAX_KEY_PARTS = 16            # a dotted key `a.b.c` has at most this many parts
MAX_NESTING = V.MAX_NESTING   # lists inside lists in a setting value (16)
MAX_NUMBER_CHARS = 100        # characters in one number (an int of 100 digits is far beyond any use)
MAX_TOKEN_CHARS = 4096        # characters in a key (an f32 block and a string are not limited)
MAX_LINES = 4_000_000         # lines in a file (a 10 MB file has fewer)
MAX_TABLE_VALUES = 1 << 26    # float32 values in all tables together (256 MB): vocab_size x (tables)
MAX_GRAPH_WORK = 1 << 23       # residual writes x reads + outputs x (nodes + edges): the checks' graph
MAX_COMPILED_VALUES = 1 << 26  # float32 values in the compiled circuit's tables and weight matrices (256 MB)

TOKENIZER_KINDS = ("bytes", "tiktoken", "data_gym")
NORM_MODES = ("live", "frozen")
ABLATION_KINDS = ("mean", "zero", "resample")

POSITIVE_INTS = {"block_size": MAX_BLOCK_SIZE, "vocab_size": MAX_VOCAB, "n_layer": MAX_LAYERS,
                 "n_head": MAX_WIDTH, "d_head": MAX_WIDTH, "d_model": MAX_WIDTH, "d_mlp": MAX_WIDTH}
# The sites and the widths: needed to read the rest of the file.
REQUIRED_CONFIG = ("n_layer", "n_head", "d_head", "d_model", "d_mlp", "vocab_size")
# Needed by compile and run (the activation, the longest prompt), checked with the rest of what running needs.
RUN_CONFIG = ("block_size", "activation_type")
BOOLEANS = ("bias", "ln_bias", "rms_norm", "tied_unembed", "enable_bigram_table", "sink")
CHOICES = {"activation_type": ("gelu", "relu"), "residual_activation_type": ("identity", "relu")}


KINDS = ((bool, "a boolean"), (int, "a whole number"), (float, "a number"), (str, "a string"), (list, "a list"))


def kind_of(value) -> str:
    """A setting's kind in words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a group of settings" if value else "{}"
    return next((words for kind, words in KINDS if isinstance(value, kind)), f"a {type(value).__name__}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return is_number(value) and math.isfinite(value)


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------- config

def check_config(config: dict, fail) -> None:
    """``fail(path, message)`` at the first config field that compile or run cannot use."""
    for name in REQUIRED_CONFIG:
        if name not in config:
            fail((), f"config: {name} is missing (the config holds every model config field)")
    for name, limit in POSITIVE_INTS.items():
        if name not in config:
            continue
        value = config[name]
        if not is_int(value) or value < 1:
            fail((name,), f"config: {name} must be a positive whole number, got {show(value)}")
        if value > limit:
            fail((name,), f"config: {name} = {value} is beyond circuitir's limit of {limit}")
    width = config["n_head"] * config["d_head"]
    if width > MAX_WIDTH:
        fail(("n_head",), f"config: n_head x d_head = {width} is beyond circuitir's limit of {MAX_WIDTH}")
    for name in BOOLEANS:
        if name in config and not isinstance(config[name], bool):
            fail((name,), f"config: {name} must be true or false, got {show(config[name])}")
    for name, choices in CHOICES.items():
        if name in config and config[name] not in choices:
            fail((name,), f"config: {name} must be one of {', '.join(map(repr, choices))}, "
                          f"got {show(config[name])}")
    afrac = config.get("afrac")
    if afrac is not None:
        if not is_finite_number(afrac) or not 0 < afrac <= 1:
            fail(("afrac",), f"config: afrac must be null or a number in (0, 1], got {show(afrac)}")
        locations = config.get("afrac_loctypes")
        if not isinstance(locations, str):
            fail(("afrac_loctypes",) if "afrac_loctypes" in config else (),
                 "config: afrac_loctypes (a string of locations) is needed when afrac is set")
        for location in locations.split(","):
            if location and location not in ACTIVATION_SPARSITY_LOCATIONS:
                fail(("afrac_loctypes",), f"config: unknown activation-sparsity location {location!r} in "
                                          f"afrac_loctypes (known: {', '.join(ACTIVATION_SPARSITY_LOCATIONS)})")
    elif "afrac_loctypes" in config and not isinstance(config["afrac_loctypes"], str):
        fail(("afrac_loctypes",), f"config: afrac_loctypes must be a string, got {show(config['afrac_loctypes'])}")
    d_pos_emb = config.get("d_pos_emb")
    if d_pos_emb is not None and d_pos_emb != config["d_model"]:
        fail(("d_pos_emb",), f"config: d_pos_emb must be null or d_model ({config['d_model']}), got {show(d_pos_emb)}")


# ---------------------------------------------------------------- header

def check_header(header: dict, fail) -> None:
    """``fail(path, message)`` at the first header field that run, check, diff or render cannot use.

    Fields they do not read may hold anything a setting can hold."""

    def group(name, value, *, string_ok=False):
        if isinstance(value, dict) or (string_ok and isinstance(value, str)):
            return
        words = "a string or a group of settings" if string_ok else "a group of settings"
        fail((name,), f"header: {name} must be {words} ({name}.x = ...), got {kind_of(value)}")

    def field(path, check, words):
        where = header
        for part in path[:-1]:
            where = where.get(part) if isinstance(where, dict) else None
        if isinstance(where, dict) and path[-1] in where and not check(where[path[-1]]):
            fail(path, f"header: {'.'.join(path)} must be {words}, got {show(where[path[-1]])}")

    if "norm" in header and header["norm"] not in NORM_MODES:
        fail(("norm",), f"header: norm must be \"live\" or \"frozen\", got {show(header['norm'])}")
    for name in ("source", "calibration", "metrics"):
        if name in header:
            group(name, header[name])
    for name in ("task", "ablation"):
        if name in header:
            group(name, header[name], string_ok=True)
    field(("seed",), is_int, "a whole number")
    field(("source", "sha256"), lambda v: isinstance(v, str), "a string")
    field(("task", "name"), lambda v: isinstance(v, str), "a string")
    field(("ablation", "kind"), lambda v: v in ABLATION_KINDS, "one of " + ", ".join(map(repr, ABLATION_KINDS)))
    field(("ablation", "over"), lambda v: v in ("pretrain", "task"), "\"pretrain\" or \"task\"")
    field(("ablation", "tokens"), lambda v: is_int(v) and 0 < v <= MAX_ABLATION_TOKENS, "a whole number in [1, 2^30]")
    field(("calibration", "scale"), is_finite_number, "a finite number")
    field(("calibration", "shift"), is_finite_number, "a finite number")
    field(("metrics", "target_loss"), lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0")
    field(("metrics", "loss"), lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0")
    field(("metrics", "selection_goal"), lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0")
    field(("pipeline",), lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
          "a string or a list of strings")
    source = header.get("source")
    if isinstance(source, dict) and "sha256" in source:
        # A header that names its source model can be checked against it: check reads these as groups.
        for name in ("task", "ablation"):
            if name in header and not isinstance(header[name], dict):
                fail((name,), f"header: {name} must be a group of settings ({name}.{'name' if name == 'task' else 'kind'}"
                              f" = ...) in a circuit that names its source model (source.sha256), got "
                              f"{kind_of(header[name])}")
    if isinstance(source, dict) and "tokenizer" in source:
        check_tokenizer(source["tokenizer"], fail)


def check_tokenizer(spec, fail) -> None:
    """``source.tokenizer``: a table (``kind = "bytes"``; ``"tiktoken"`` with ``path``, ``eot_token``;
    ``"data_gym"`` with ``name``, ``dir``, ``sha256``: OpenAI's vocab.bpe + encoder.json BPE, as a circuit
    extracted from a released model records it), or a string describing the vocabulary in words (run then
    reads prompts as token ids)."""
    path = ("source", "tokenizer")
    if isinstance(spec, str):
        return
    if not isinstance(spec, dict):
        fail(path, f"header: source.tokenizer must be a group of settings (source.tokenizer.kind = "
                   f"\"bytes\") or a string describing the vocabulary, got {kind_of(spec)}")
    kind = spec.get("kind")
    if kind not in TOKENIZER_KINDS:
        fail(path + ("kind",) if "kind" in spec else path,
             f"header: source.tokenizer.kind must be one of {', '.join(map(repr, TOKENIZER_KINDS))}, got {show(kind)}")
    if kind == "tiktoken":
        if not isinstance(spec.get("path"), str):
            fail(path + ("path",) if "path" in spec else path,
                 "header: source.tokenizer.path (the .tiktoken file, a string) is needed for a tiktoken tokenizer")
        eot = spec.get("eot_token", 2047)
        if not is_int(eot) or not 0 <= eot < MAX_VOCAB:
            fail(path + ("eot_token",), f"header: source.tokenizer.eot_token must be a whole number in "
                                        f"[0, {MAX_VOCAB}), got {show(eot)}")
    if kind == "data_gym":
        for key, what in (("name", "the BPE's name, such as \"tinypython_2k\""),
                          ("dir", "the directory that held vocab.bpe and encoder.json")):
            if key in spec and not isinstance(spec[key], str):
                fail(path + (key,), f"header: source.tokenizer.{key} ({what}) must be a string, got {show(spec[key])}")
        digest = spec.get("sha256")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                       and all(c in "0123456789abcdef" for c in digest)):
            fail(path + ("sha256",), f"header: source.tokenizer.sha256 must be 64 lowercase hex digits (the "
                                     f"tokenizer files' SHA-256), got {show(digest)}")
