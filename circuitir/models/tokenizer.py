"""Tokenizers: bytes by default, OpenAI's ``tinypython_2k`` BPE when its files are given.

A tokenizer is described by a small dict (``{"kind": "bytes"}``,
``{"kind": "tiktoken", "path": ...}`` or ``{"kind": "data_gym", "name":
"tinypython_2k", "dir": ..., "sha256": ...}``) that checkpoints and circuit
headers record, so a model always comes back with the tokenizer it was
trained with.

OpenAI's released models name their tokenizer in ``beeg_config.json``
(``tokenizer_name = "tinypython_2k"``): a GPT-2 style "data gym" BPE given as
``vocab.bpe`` (the merges) and ``encoder.json`` (token string -> id). circuitir
never downloads it: the user points at a directory holding both files with
``--tokenizer DIR``, the environment variable ``CIRCUITIR_TOKENIZER``
(OpenAI's ``TINYPYTHON_TOK_DIR`` works too), or by putting the two files in
the release directory beside ``beeg_config.json``. The ``tiktoken.Encoding``
is built in memory from those files (tiktoken's loaders, which may fetch
URLs and cache, are not used).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from circuitir.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes, one token each: 256 tokens, no merges, nothing to download."""

    vocab_size = 256
    spec = {"kind": "bytes"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")

    def token_str(self, token: int) -> str:
        return self.decode([token])


class _EncodingTokenizer:
    """What every tiktoken-backed tokenizer shares: ``self.encoding`` does the work."""

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, tokens: list[int]) -> str:
        return self.encoding.decode(tokens)

    def token_str(self, token: int) -> str:
        return self.decode([token])


class TiktokenTokenizer(_EncodingTokenizer):
    """A BPE read from a local ``.tiktoken`` ranks file."""

    def __init__(self, path: str, eot_token: int = 2047):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise UserError("tokenizer: the tiktoken package is needed for BPE files "
                            "(pip install tiktoken)") from None
        if not Path(path).is_file():
            raise UserError(f"tokenizer: no such file {path!r}")
        ranks = load_tiktoken_bpe(str(path))
        self.encoding = tiktoken.Encoding(
            name=Path(path).stem,
            pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
            mergeable_ranks=ranks, special_tokens={"<|endoftext|>": eot_token})
        self.vocab_size = eot_token + 1
        self.spec = {"kind": "tiktoken", "path": str(path), "eot_token": eot_token}



TOKENIZER_ENV = "CIRCUITIR_TOKENIZER"
OPENAI_TOKENIZER_ENV = "TINYPYTHON_TOK_DIR"  # what OpenAI's own code reads
DATA_GYM_FILES = ("vocab.bpe", "encoder.json")
ENDOFTEXT = "<|endoftext|>"

# The pre-tokenisation regex of each data-gym BPE circuitir knows, by the name a config gives.
# tinypython_2k's is part of the tokenizer's definition (OpenAI's circuit_sparsity release).
PATTERNS = {
    "tinypython_2k": r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}


def _data_gym_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes: printable Latin-1 bytes are themselves, the rest are
    mapped in order to U+0100, U+0101, ..."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    alphabet = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in alphabet.values()]
    for n, b in enumerate(others):
        alphabet[chr(256 + n)] = b
    return alphabet


def data_gym_ranks(vocab_bpe: str, encoder: dict) -> tuple[dict[bytes, int], dict[str, int]]:
    """Mergeable ranks and special tokens of a data-gym BPE (the 256 bytes, then one token per merge,
    in the order of vocab.bpe), checked against encoder.json. Raises ValueError naming what is wrong."""
    alphabet = _data_gym_alphabet()

    def to_bytes(text: str) -> bytes:
        try:
            return bytes(alphabet[ch] for ch in text)
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the data-gym byte alphabet") from None

    byte_order = [alphabet[ch] for ch in sorted(alphabet, key=ord)]
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order)}
    lines = vocab_bpe.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"vocab.bpe line {number}: expected two tokens to merge, got {line[:40]!r}")
        merged = to_bytes(parts[0]) + to_bytes(parts[1])
        ranks.setdefault(merged, len(ranks))
    if not isinstance(encoder, dict):
        raise ValueError("encoder.json must be one JSON object of token -> id")
    special = {k: v for k, v in encoder.items() if k.startswith("<|") and k.endswith("|>")}
    listed = {to_bytes(k): v for k, v in encoder.items() if k not in special}
    if listed != ranks:
        wrong = next((k for k in ranks if listed.get(k) != ranks[k]), None) or next(iter(listed.keys() - ranks.keys()))
        raise ValueError(f"encoder.json does not match vocab.bpe (token {wrong!r}: encoder.json says "
                         f"{listed.get(wrong)}, the merges give {ranks.get(wrong)})")
    return ranks, special


class DataGymTokenizer(_EncodingTokenizer):
    """A GPT-2 style BPE from ``vocab.bpe`` + ``encoder.json`` (OpenAI's tinypython_2k), via tiktoken."""

    def __init__(self, directory: str | Path, name: str = "tinypython_2k", expected_sha256: str | None = None):
        try:
            import tiktoken
        except ImportError:
            raise UserError("tokenizer: the tiktoken package is needed for BPE tokenizers "
                            "(pip install tiktoken)") from None
        if name not in PATTERNS:
            raise UserError(f"tokenizer: unknown BPE {name!r} (known: {', '.join(PATTERNS)})")
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"tokenizer: no such directory {directory} (it should hold "
                            f"{' and '.join(DATA_GYM_FILES)})")
        texts = {}
        for filename in DATA_GYM_FILES:
            try:
                texts[filename] = (directory / filename).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise UserError(f"tokenizer: {directory} has no {filename} (a {name} tokenizer directory "
                                f"holds {' and '.join(DATA_GYM_FILES)})") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"tokenizer: cannot read {directory / filename}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
        digest = hashlib.sha256()
        for filename in DATA_GYM_FILES:
            digest.update(hashlib.sha256(texts[filename].encode()).digest())
        sha256 = digest.hexdigest()
        if expected_sha256 is not None and expected_sha256 != sha256:
            raise UserError(f"tokenizer: the files in {directory} differ from the {name} files this was made "
                            f"with (sha256 {sha256[:12]}..., recorded {expected_sha256[:12]}...)")
        try:
            encoder = json.loads(texts["encoder.json"])
            ranks, special = data_gym_ranks(texts["vocab.bpe"], encoder)
        except json.JSONDecodeError as exc:
            raise UserError(f"tokenizer: {directory / 'encoder.json'}:{exc.lineno}:{exc.colno}: "
                            f"not valid JSON: {exc.msg}") from None
        except ValueError as exc:
            raise UserError(f"tokenizer: {directory}: {exc}") from None
        if name == "tinypython_2k":
            special.setdefault(ENDOFTEXT, 2047)
        self.encoding = tiktoken.Encoding(name=name, pat_str=PATTERNS[name], mergeable_ranks=ranks,
                                          special_tokens=special)
        self.vocab_size = self.encoding.n_vocab
        self.spec = {"kind": "data_gym", "name": name, "dir": str(directory.resolve()), "sha256": sha256}



def tokenizer_directory(explicit: str | Path | None = None, beside: str | Path | None = None) -> Path | None:
    """Where to read a BPE's files: ``explicit`` (--tokenizer), then $CIRCUITIR_TOKENIZER, then
    $TINYPYTHON_TOK_DIR, then ``beside`` (a release directory) when it holds both files."""
    for candidate in (explicit, os.environ.get(TOKENIZER_ENV), os.environ.get(OPENAI_TOKENIZER_ENV)):
        if candidate:
            return Path(candidate)
    if beside is not None and all((Path(beside) / f).is_file() for f in DATA_GYM_FILES):
        return Path(beside)
    return None


def openai_tokenizer(name: str | None, vocab_size: int, explicit: str | Path | None = None,
                     beside: str | Path | None = None):
    """The tokenizer a released model names, or None when it needs files nobody pointed at."""
    if vocab_size <= 256 and explicit is None:
        return ByteTokenizer()
    directory = tokenizer_directory(explicit, beside)
    if directory is None:
        return None
    tokenizer = DataGymTokenizer(directory, name or "tinypython_2k")
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer: {directory} has {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocabulary of {vocab_size}; it is not this model's tokenizer")
    return tokenizer


class TokenIdTokenizer:
    """For a vocabulary described only in words (a hand-written circuit's ``source.tokenizer = "..."``):
    a prompt is its token ids, separated by spaces (``"1 2 3"``)."""

    def __init__(self, description: str):
        self.description = description
        self.spec = description

    def encode(self, text: str) -> list[int]:
        words = text.split()
        bad = next((w for w in words if not (w.isascii() and w.isdigit() and len(w) <= 9)), None)
        if bad is not None:
            raise UserError(f"prompt {text[:30]!r}: the vocabulary is described only in words "
                            f"({self.description[:60]!r}), so a prompt is token ids separated by spaces "
                            f"(such as '1 2 3'), not {bad[:20]!r}")
        return [int(w) for w in words]

    def decode(self, tokens: list[int]) -> str:
        return " ".join(map(str, tokens))

    def token_str(self, token: int) -> str:
        return str(token)


def tokenizer_from_spec(spec: dict | str | None):
    if isinstance(spec, str):
        return TokenIdTokenizer(spec)
    spec = spec or {"kind": "bytes"}
    if not isinstance(spec, dict):
        raise UserError(f"tokenizer: the spec must be a table such as {{\"kind\": \"bytes\"}}, got "
                        f"a {type(spec).__name__}")
    if spec.get("kind") == "bytes":
        return ByteTokenizer()
    if spec.get("kind") == "tiktoken":
        path, eot = spec.get("path"), spec.get("eot_token", 2047)
        if not isinstance(path, str) or isinstance(eot, bool) or not isinstance(eot, int) or eot < 0:
            raise UserError(f"tokenizer: a tiktoken spec needs a path (a string) and an eot_token (a whole "
                            f"number), got path {path!r}, eot_token {eot!r}")
        return TiktokenTokenizer(path, eot)
    if spec.get("kind") == "data_gym":
        # The recorded directory if it is still there, else wherever the user points now.
        recorded = Path(str(spec.get("dir", "")))
        directory = tokenizer_directory() or recorded
        if not directory.is_dir() and recorded.is_dir():
            directory = recorded
        if not directory.is_dir():
            raise UserError(f"tokenizer: the {spec.get('name')} files are not at {recorded} on this machine; "
                            f"set {TOKENIZER_ENV} to a directory holding {' and '.join(DATA_GYM_FILES)}")
        return DataGymTokenizer(directory, spec.get("name", "tinypython_2k"), spec.get("sha256"))
    raise UserError(f"tokenizer: unknown kind {spec.get('kind')!r} (known: bytes, tiktoken, data_gym)")
