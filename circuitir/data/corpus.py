"""The pretraining corpus: a tree of Python source files, read in a fixed order.

The default is the standard library of the running interpreter (minus its
``test`` packages and site-packages), which every machine has and nothing has
to download. Files are split into train and validation by a hash of their
relative path, so the split does not move when files are added elsewhere, and
the corpus is identified by a SHA-256 over (path, content) pairs.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitir.errors import UserError

EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not EXCLUDED_PARTS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_validation(relative_path: str, every: int = 20) -> bool:
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % every == 0


@dataclass
class Corpus:
    root: str
    sha256: str
    n_files: int
    train: torch.Tensor  # uint8/int tokens, files joined by a separator
    validation: torch.Tensor

    def describe(self) -> dict:
        return {"root": self.root, "sha256": self.sha256, "files": self.n_files,
                "train_tokens": int(self.train.numel()), "validation_tokens": int(self.validation.numel())}


def load_corpus(root: str | Path | None = None, tokenizer=None, separator: str = "\n\n") -> Corpus:
    """Read every .py file under ``root`` (default: this interpreter's stdlib) and tokenize it."""
    from circuitir.models.tokenizer import ByteTokenizer
    tokenizer = tokenizer or ByteTokenizer()
    root = Path(root) if root is not None else default_corpus_dir()
    if not root.is_dir():
        raise UserError(f"corpus: {root} is not a directory (give --corpus a directory of .py files)")
    files = python_files(root)
    if not files:
        raise UserError(f"corpus: no .py files under {root} (give --corpus a directory of Python source)")
    digest = hashlib.sha256()
    parts = {"train": [], "validation": []}
    for path in files:
        relative = path.relative_to(root).as_posix()
        text = path.read_bytes().decode("utf-8", errors="replace")
        digest.update(relative.encode() + b"\0" + text.encode() + b"\0")
        split = "validation" if is_validation(relative) else "train"
        parts[split].append(text)
    if not parts["validation"]:  # tiny trees: hold out the last file
        parts["validation"].append(parts["train"].pop())
    if not parts["train"]:
        parts["train"] = list(parts["validation"])

    def tokens(texts: list[str]) -> torch.Tensor:
        dtype = torch.uint8 if tokenizer.vocab_size <= 256 else torch.int16
        return torch.tensor(tokenizer.encode(separator.join(texts)), dtype=dtype)

    return Corpus(str(root), digest.hexdigest(), len(files), tokens(parts["train"]), tokens(parts["validation"]))
