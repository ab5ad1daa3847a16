"""Shared fixtures: one CPU thread, tiny models, a tiny corpus.

The machine that runs the suite may have two cores busy with training, so every
model here is a few thousand parameters and every training run a few steps.
"""

from __future__ import annotations

import pytest
import torch

from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT

torch.set_num_threads(1)


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(block_size=16, vocab_size=256, n_layer=2, n_head=2, d_head=4, d_model=8, d_mlp=16)
    fields.update(overrides)
    return GPTConfig(**fields)


def randomize_(model: SparseGPT, seed: int = 0, scale: float = 0.5) -> SparseGPT:
    """Fill every parameter and buffer (wpe, biases, norm gains, sink, bigram, final bias) with noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


@pytest.fixture
def make_model():
    """``make_model(seed=..., **config fields)`` -> a SparseGPT with every weight random."""
    def make(seed: int = 0, **overrides) -> SparseGPT:
        return randomize_(SparseGPT(tiny_config(**overrides)), seed).eval()
    return make


@pytest.fixture
def random_tokens():
    def make(batch: int = 3, length: int = 16, vocab: int = 256, seed: int = 0) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return make


def write_corpus(root, n_files: int = 4) -> None:
    """A few small, varied Python files: enough for the tiny preset's 129-token windows."""
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = [f"import os\n\n\nclass Thing{f}:\n    def __init__(self, value):\n        self.value = value\n"]
        for i in range(12):
            lines.append(f"\n\ndef func_{f}_{i}(x, y={i}):\n    if x > {i * f}:\n        return [x, y, '{i}']\n"
                         f"    while x < {i + 3}:\n        x += 1\n    return {{'key': x, \"other\": {f}}}\n")
        (root / f"module_{f}.py").write_text("".join(lines))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root
