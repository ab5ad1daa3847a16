"""Tokenizers: bytes by default, OpenAI's ``tinypython_2k`` BPE when its files are given.

A tokenizer is described by a small dict (``{"kind": "bytes"}`` or
``{"kind": "tiktoken", "path": ...}``) that checkpoints record, so a model
always comes back with the tokenizer it was trained with.
"""

from __future__ import annotations

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


class TiktokenTokenizer:
    """A BPE read from a local ``.tiktoken`` ranks file (e.g. OpenAI's tinypython_2k)."""

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

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, tokens: list[int]) -> str:
        return self.encoding.decode(tokens)

    def token_str(self, token: int) -> str:
        return self.decode([token])


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
    raise UserError(f"tokenizer: unknown kind {spec.get('kind')!r} (known: bytes, tiktoken)")
