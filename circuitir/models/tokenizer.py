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


def tokenizer_from_spec(spec: dict | None):
    spec = spec or {"kind": "bytes"}
    if spec.get("kind") == "bytes":
        return ByteTokenizer()
    if spec.get("kind") == "tiktoken":
        return TiktokenTokenizer(spec["path"], spec.get("eot_token", 2047))
    raise UserError(f"tokenizer: unknown kind {spec.get('kind')!r} (known: bytes, tiktoken)")
