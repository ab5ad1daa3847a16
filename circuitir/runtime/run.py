"""Run a circuit on prompts: the candidates' logits at each prompt's last token."""

from __future__ import annotations

import torch

from circuitir.errors import UserError
from circuitir.ir.circuit import Circuit
from circuitir.models.tokenizer import tokenizer_from_spec
from circuitir.runtime.compile import compile_circuit


def circuit_tokenizer(circuit: Circuit):
    spec = circuit.provenance.tokenizer
    if spec is None and circuit.config["vocab_size"] <= 256:
        spec = {"kind": "bytes"}
    if spec is None:
        raise UserError("the circuit does not record its tokenizer (header source.tokenizer)")
    return tokenizer_from_spec(spec)


def encode_prompts(prompts: list[str], tokenizer, block_size: int,
                   vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (N, T) and each prompt's last index (N,)."""
    if not prompts:
        raise UserError("no prompts given")
    rows = [tokenizer.encode(p) for p in prompts]
    for prompt, row in zip(prompts, rows):
        if not row:
            raise UserError("an empty prompt has no last token to predict from")
        if len(row) > block_size:
            raise UserError(f"prompt {prompt[:30]!r}... is {len(row)} tokens, longer than the model's context "
                            f"of {block_size}; shorten it")
        outside = [t for t in row if vocab_size is not None and not 0 <= t < vocab_size]
        if outside:
            raise UserError(f"prompt {prompt[:30]!r} has token {outside[0]} ({tokenizer.token_str(outside[0])!r}), "
                            f"outside the circuit's vocabulary of {vocab_size} tokens")
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
    return tokens, torch.tensor([len(r) - 1 for r in rows])


@torch.no_grad()
def run_prompts(circuit: Circuit, prompts: list[str], module=None) -> list[dict]:
    tokenizer = circuit_tokenizer(circuit)
    tokens, last = encode_prompts(prompts, tokenizer, circuit.config["block_size"], circuit.config["vocab_size"])
    module = module or compile_circuit(circuit)
    logits = module(tokens)[torch.arange(len(prompts)), last]  # (N, K)
    names = [tokenizer.token_str(t) for t in circuit.candidates]
    out = []
    for prompt, row in zip(prompts, logits):
        values = {name: float(v) for name, v in zip(names, row)}
        out.append({"prompt": prompt, "logits": values, "prediction": names[int(row.argmax())]})
    return out
