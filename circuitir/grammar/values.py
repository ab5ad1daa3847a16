"""How numbers, settings and tables are spelled in .cir text.

Shared by the parser and the emitter, so that each spelling is defined once
and the two stay exact inverses:

* a *weight* (every float of the circuit itself) is a float32, written as the
  shortest decimal that reads back to the same float32 (``0.1``, ``-1.5e-07``,
  ``inf``, ``nan``);
* a *setting* (header and config values) is a JSON-like value: ``"text"``,
  ``3`` (int), ``3.0`` (float, Python's shortest repr, so any float64),
  ``true``/``false``, ``null``, a list ``[...]`` or the empty dict ``{}``;
* a *table* (one float32 per token) is sparse ``{token: weight, ...}`` when
  at most half its entries are nonzero, otherwise ``f32"..."``: the
  little-endian float32 bytes in base64, wrapped at 64 characters (12 values a
  line).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import json
import math
import re
import struct

import numpy as np
import torch

F32_MAX = float(np.finfo(np.float32).max)
INT_RE = re.compile(r"[+-]?[0-9]+\Z")
BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
KEY_PART_RE = re.compile(r'[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"')
SPARSE_PER_LINE = 8
BASE64_PER_LINE = 64  # 48 bytes: 12 float32 values, so a changed value changes one line


class ValueSpellingError(ValueError):
    """A value that the text cannot hold exactly (or text that is no value)."""


# ---------------------------------------------------------------- weights

def is_float32(x: float) -> bool:
    return math.isnan(x) or float(np.float32(x)) == x


def format_f32(x: float) -> str:
    """The shortest decimal that reads back (with :func:`parse_f32`) to exactly ``x``."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if not is_float32(x):
        raise ValueSpellingError(f"{x!r} is not a float32 value (round it with float(numpy.float32(x)))")
    text = str(np.float32(x))
    if _same_bits(parse_f32(text), x):
        return text
    return repr(x)  # exact as a float64, hence as a float32; not reached for numpy's shortest form


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while a file is read or written: both allocate hundreds of
    thousands of small objects and no cycles, and the collector's passes over them took more than half
    of the parse time of a 10 MB file (benchmarks/parse_speed.py). Nested uses are fine."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_F32 = struct.Struct("<f")


def parse_f32(text: str) -> float:
    """A number rounded to float32 (to nearest, ties to even, as numpy and torch round)."""
    value = float(text)
    try:
        return _F32.unpack(_F32.pack(value))[0]
    except OverflowError:  # finite, but rounds to infinity in float32
        raise ValueSpellingError(f"{text} is out of the float32 range (largest {F32_MAX:.8g})") from None


def _same_bits(a: float, b: float) -> bool:
    return np.float32(a).view(np.uint32) == np.float32(b).view(np.uint32)


def is_default(x: float, default: float) -> bool:
    """Whether ``x`` is ``default`` bit for bit (so -0.0 and nan are written out)."""
    return _same_bits(x, default)


# ---------------------------------------------------------------- settings

MAX_NESTING = 16  # lists inside lists: the parser reads no deeper (grammar/schema.py), so none is written


def format_setting(value, where: str, depth: int = 0) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        if depth >= MAX_NESTING:
            raise ValueSpellingError(f"{where}: lists nested more than {MAX_NESTING} deep cannot be written")
        return "[" + ", ".join(format_setting(v, where, depth + 1) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    kind = "a dict" if isinstance(value, dict) else f"a {type(value).__name__}"
    raise ValueSpellingError(f"{where}: {kind} cannot be written as a setting (settings are strings, "
                             "ints, floats, booleans, null, lists of those, and nested dicts by dotted keys)")


def parse_number_setting(text: str) -> int | float:
    return int(text) if INT_RE.match(text) else float(text)


def parse_string(text: str) -> str:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueSpellingError(f"bad string {text}: {exc.msg}") from None


def format_key(path: tuple[str, ...]) -> str:
    return ".".join(part if BARE_KEY_RE.match(part) else json.dumps(part) for part in path)


def parse_key(text: str) -> tuple[str, ...]:
    """``metrics."a b".loss =`` -> ("metrics", "a b", "loss") (the grammar has checked the shape)."""
    text = text.rstrip()[:-1].rstrip()
    return tuple(parse_string(p) if p.startswith('"') else p for p in KEY_PART_RE.findall(text))


# ---------------------------------------------------------------- tables

def table_array(tensor: torch.Tensor, what: str) -> np.ndarray:
    """A 1-D table as float32 numpy values, refusing anything float32 cannot hold exactly."""
    if tensor.dim() != 1:
        raise ValueSpellingError(f"{what}: a table is one-dimensional, got shape {tuple(tensor.shape)}")
    values = tensor.detach().cpu()
    as_f32 = values.to(torch.float32)
    if values.dtype != torch.float32:
        same = (as_f32.double() == values.double()) | (values.double().isnan() & as_f32.isnan())
        if not bool(same.all()):
            raise ValueSpellingError(f"{what}: values are not float32 values (convert the table to float32)")
    return as_f32.numpy().astype("<f4")


def format_table(values: np.ndarray, length: int, indent: str) -> str:
    """The table's text; continuation lines get ``indent`` + 4 spaces."""
    nonzero = np.flatnonzero(values.view(np.uint32))
    more = "\n" + indent + "    "
    if len(values) == length and 2 * len(nonzero) <= length:
        entries = [f"{i}: {format_f32(values[i])}" for i in nonzero]
        if len(entries) <= SPARSE_PER_LINE:
            return "{" + ", ".join(entries) + "}"
        rows = [", ".join(entries[i:i + SPARSE_PER_LINE]) + ","
                for i in range(0, len(entries), SPARSE_PER_LINE)]
        return "{" + more + more.join(rows) + "\n" + indent + "}"
    text = base64.b64encode(values.astype("<f4").tobytes()).decode("ascii")
    if len(text) <= BASE64_PER_LINE:
        return f'f32"{text}"'
    rows = [text[i:i + BASE64_PER_LINE] for i in range(0, len(text), BASE64_PER_LINE)]
    return 'f32"' + more + more.join(rows) + '"'


def decode_f32_block(token_text: str) -> np.ndarray:
    """``f32"..."`` -> float32 values."""
    body = re.sub(r"\s+", "", token_text[4:-1])
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueSpellingError(f"the f32 block is not valid base64 ({exc})") from None
    if len(raw) % 4:
        raise ValueSpellingError(f"the f32 block holds {len(raw)} bytes, not a whole number of float32 values")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)
