"""``check --prompts P.jsonl``: how a circuit does on prompts the user brings (e.g. cut from real code).

P.jsonl has the task-file format (:mod:`circuitir.tasks.task_file`); every
line is used, whatever its split. Reported beside the task's own claims (it
does not change whether ``check`` passes):

* ``circuit``: the compiled circuit alone on these prompts, loss and
  accuracy, and ``sufficient`` (loss at most the circuit's target loss);
* ``model``: the full model's loss and accuracy on them;
* ``agreement``: the fraction of prompts on which circuit and full model
  prefer the same one of the two answers.
"""

from __future__ import annotations

import torch

from circuitir.errors import UserError


@torch.no_grad()
def prompt_agreement(circuit, loaded, path: str, target: float | None = None) -> dict:
    from circuitir.runtime.compile import compile_circuit
    from circuitir.runtime.evaluate import pair_logits_from_candidates
    from circuitir.tasks import first_token
    from circuitir.tasks.evaluate import accuracy, binary_loss, candidate_logits, encode_examples
    from circuitir.tasks.task_file import load_task_file

    prompts = load_task_file(path)
    prompts.check_tokenizer(loaded.tokenizer)
    outputs = set(int(t) for t in circuit.candidates)
    for number, example, _ in prompts.lines:
        for text in (example.correct, example.alternative):
            token = first_token(loaded.tokenizer, text)
            if token not in outputs:
                raise UserError(f"{path}:{number}: answer {text!r} starts with token {token} "
                                f"({loaded.tokenizer.token_str(token)!r}), which is not one of the circuit's outputs "
                                f"{sorted(outputs)}; bring prompts for the task the circuit computes")
    examples = [example for _, example, _ in prompts.lines]
    batch = encode_examples(prompts, examples, loaded.tokenizer, loaded.config.block_size)
    circuit_pairs = pair_logits_from_candidates(compile_circuit(circuit)(batch.tokens), batch, circuit.candidates)
    device = next(loaded.model.parameters()).device
    model_pairs = candidate_logits(loaded.model(batch.tokens.to(device)), batch).float().cpu()
    agree = (circuit_pairs[:, 0] > circuit_pairs[:, 1]) == (model_pairs[:, 0] > model_pairs[:, 1])
    loss = float(binary_loss(circuit_pairs))
    return {"file": str(path), "sha256": prompts.sha256, "n": len(examples),
            "circuit": {"loss": loss, "accuracy": accuracy(circuit_pairs),
                        "sufficient": None if target is None else loss <= target},
            "model": {"loss": float(binary_loss(model_pairs)), "accuracy": accuracy(model_pairs)},
            "agreement": float(agree.float().mean())}
