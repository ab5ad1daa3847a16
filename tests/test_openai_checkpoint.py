"""OpenAI's released checkpoints in their exact layout, and the tinypython_2k-style BPE tokenizer.

The releases are written here as OpenAI's code writes them, without their code:
``beeg_config.json`` is every field of their ``GPTConfig`` (as ``dataclasses.asdict``
serialises it, plus ``bigram_table_rank`` which their loader pops), and
``final_model.pt`` is the state dict of their ``GPT`` built with ``flash=False``:
the same weight keys as circuitir's, plus a ``transformer.h.{i}.attn.bias`` causal
mask per layer and, without a learnable table, ``bigram_table`` as a buffer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from circuitir.cli import main
from circuitir.errors import UserError
from circuitir.models.checkpoint import load_model
from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import DataGymTokenizer

from conftest import randomize_, tiny_config
from test_model import reference_forward


def openai_config_json(config: GPTConfig, **changes) -> dict:
    """Every field of OpenAI's GPTConfig, in their order, with their values for this model."""
    raw = {
        "block_size": config.block_size, "vocab_size": config.vocab_size, "n_layer": config.n_layer,
        "n_head": config.n_head, "d_head": config.d_head, "d_model": config.d_model, "dropout": 0.0,
        "bias": config.bias, "ln_bias": config.ln_bias, "rms_norm": config.rms_norm,
        "residual_activation_type": config.residual_activation_type, "activation_type": config.activation_type,
        "afrac": config.afrac, "afrac_loctypes": config.afrac_loctypes, "debug_nans": False,
        "tied_unembed": config.tied_unembed, "tokenizer_name": "tinypython_2k", "grad_checkpointing": True,
        "d_mlp": config.d_mlp, "enable_bigram_table": config.enable_bigram_table,
        "learnable_bigram_table": False, "d_pos_emb": None, "dropout_cat_pos_emb": False,
        "sinusoidal_cat_pos_emb": False, "enable_sparse_kernels": False, "flash": False, "sink": config.sink,
        "bigram_table_rank": None, "use_tied_aux_matrix": False,
    }
    raw.update(changes)
    return raw


def openai_state_dict(model: SparseGPT) -> dict:
    """The state dict OpenAI's GPT(flash=False) saves: weights plus one causal-mask buffer per layer."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    size = model.config.block_size
    for i in range(model.config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(size, size)).view(1, 1, size, size)
    return state


def write_openai_release(directory, model: SparseGPT, raw_config: dict, state: dict | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(openai_state_dict(model) if state is None else state, directory / "final_model.pt")
    (directory / "beeg_config.json").write_text(json.dumps(raw_config, indent=2))


def released(tmp_path, seed=0, **overrides):
    config = tiny_config(**overrides)
    model = randomize_(SparseGPT(config), seed).eval()
    return model, config


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("variant", [dict(), dict(sink=True, enable_bigram_table=True),
                                     dict(afrac=0.5, rms_norm=False, ln_bias=True)])
def test_openai_layout_with_causal_mask_loads_and_matches_reference(tmp_path, variant, random_tokens):
    model, config = released(tmp_path, **variant)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config))
    loaded = load_model(tmp_path / "csp")
    assert loaded.config == config
    assert loaded.config.extra["flash"] is False and loaded.config.extra["tokenizer_name"] == "tinypython_2k"
    tokens = random_tokens(3, config.block_size, config.vocab_size)
    state = {k: v for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = reference_forward(state, config, tokens)
        assert torch.allclose(loaded.model(tokens), expected, atol=1e-5, rtol=0)
    assert not any(k.endswith(".attn.bias") for k in loaded.model.state_dict())


def test_absent_fields_take_openai_defaults(tmp_path):
    # OpenAI's GPTConfig defaults to LayerNorm (rms_norm=False); ours to RMSNorm. A config that
    # leaves the field out means theirs, and the LayerNorm biases in the weights then fit.
    model, config = released(tmp_path, rms_norm=False, ln_bias=True)
    raw = openai_config_json(config)
    del raw["rms_norm"]
    write_openai_release(tmp_path / "csp", model, raw)
    assert load_model(tmp_path / "csp").config.rms_norm is False


def test_old_gpt2_name_n_embd_stands_for_d_model(tmp_path):
    model, config = released(tmp_path)
    raw = openai_config_json(config)
    raw["n_embd"] = raw.pop("d_model")
    write_openai_release(tmp_path / "csp", model, raw)
    assert load_model(tmp_path / "csp").config.d_model == 8
    raw["d_model"] = 16
    write_openai_release(tmp_path / "csp", model, raw)
    with pytest.raises(UserError, match="n_embd=8 and d_model=16 disagree"):
        load_model(tmp_path / "csp")


def test_a_mask_that_is_not_causal_is_refused(tmp_path):
    model, config = released(tmp_path)
    state = openai_state_dict(model)
    state["transformer.h.1.attn.bias"] = torch.ones(1, 1, config.block_size, config.block_size)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config), state)
    with pytest.raises(UserError, match=r"transformer.h.1.attn.bias is not the causal mask"):
        load_model(tmp_path / "csp")


def test_a_mask_of_another_block_size_is_refused(tmp_path):
    model, config = released(tmp_path)
    state = openai_state_dict(model)
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config), state)
    with pytest.raises(UserError, match=r"attn.bias is \(1, 1, 8, 8\)"):
        load_model(tmp_path / "csp")


@pytest.mark.parametrize("change,message", [
    (dict(d_pos_emb=4), "d_pos_emb=4: concatenated positional embeddings"),
    (dict(d_pos_emb=8), "d_pos_emb=8"),  # equal to d_model: OpenAI still concatenates
    (dict(use_tied_aux_matrix=True), "use_tied_aux_matrix"),
    (dict(afrac=0.5, afrac_loctypes="attn_in,resid_post_mlp"), "resid_post_mlp"),
])
def test_forward_changing_options_are_refused_in_one_line(tmp_path, capsys, change, message):
    model, config = released(tmp_path)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config, **change))
    assert main(["trace", str(tmp_path / "csp")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("harmless", [dict(sinusoidal_cat_pos_emb=True), dict(dropout_cat_pos_emb=True),
                                      dict(enable_sparse_kernels=True, debug_nans=True, grad_checkpointing=False),
                                      dict(learnable_bigram_table=True, bigram_table_rank=16),
                                      dict(pfrac=0.01, expansion_factor=4, expansion_factor_mlp=4,
                                           debug_exact_topk=False, sparse_matmul_impl="dense", n_embd=8)])
def test_training_only_fields_are_accepted(tmp_path, harmless, random_tokens):
    model, config = released(tmp_path)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config, **harmless))
    tokens = random_tokens(2, config.block_size, config.vocab_size)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "csp").model(tokens), model(tokens))


# ---------------------------------------------------------------- tokenizer

def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (written from its published definition)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


MERGES = [(b"s", b"e"), (b"l", b"f"), (b"se", b"lf"), (b" ", b"="), (b"\n", b"\n"), (b"'", b"'")]


def write_bpe(directory, merges=MERGES, eot: int | None = None) -> dict[bytes, int]:
    """A small data-gym BPE (vocab.bpe + encoder.json) in the tinypython_2k file format."""
    table = gpt2_bytes_to_unicode()
    spell = lambda bs: "".join(table[b] for b in bs)  # noqa: E731
    order = sorted(range(256), key=lambda b: ord(table[b]))
    ids = {bytes([b]): i for i, b in enumerate(order)}
    for a, b in merges:
        ids[a + b] = len(ids)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n" for a, b in merges))
    encoder = {spell(token): i for token, i in ids.items()}
    encoder["<|endoftext|>"] = len(ids) if eot is None else eot
    (directory / "encoder.json").write_text(json.dumps(encoder))
    return ids


def test_data_gym_bpe_encodes_with_its_merges_and_regex(tmp_path):
    ids = write_bpe(tmp_path / "tok")
    tokenizer = DataGymTokenizer(tmp_path / "tok")
    assert tokenizer.encode(" ") == [220] and tokenizer.encode("!") == [0]  # GPT-2's byte ids
    assert tokenizer.encode("self") == [ids[b"self"]]
    # tinypython's regex: a non-letter may lead a word (".self" is one piece), newlines group.
    assert tokenizer.encode(".self") == [ids[b"."], ids[b"self"]]
    assert tokenizer.encode("x = 'a'\n\n") == [ids[b"x"], ids[b" ="], ids[b" "], ids[b"'"], ids[b"a"],
                                               ids[b"'"], ids[b"\n\n"]]
    text = "def f(self):\n    return 'é' + \"x\"\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == len(ids) + 1
    assert tokenizer.spec["kind"] == "data_gym" and len(tokenizer.spec["sha256"]) == 64


def test_tokenizer_directory_missing_a_file_is_one_clear_line(tmp_path, capsys):
    write_bpe(tmp_path / "tok")
    (tmp_path / "tok" / "encoder.json").unlink()
    with pytest.raises(UserError, match="has no encoder.json"):
        DataGymTokenizer(tmp_path / "tok")
    model, config = released(tmp_path, vocab_size=300)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config))
    assert main(["eval", str(tmp_path / "csp"), "--task", "quotes", "--tokenizer", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert "has no encoder.json" in err and err.count("\n") == 1


def test_encoder_that_disagrees_with_merges_is_refused(tmp_path):
    write_bpe(tmp_path / "tok")
    encoder = json.loads((tmp_path / "tok" / "encoder.json").read_text())
    encoder["self"] += 1
    (tmp_path / "tok" / "encoder.json").write_text(json.dumps(encoder))
    with pytest.raises(UserError, match="does not match vocab.bpe"):
        DataGymTokenizer(tmp_path / "tok")


def test_release_finds_its_tokenizer_by_option_env_or_beside(tmp_path, monkeypatch):
    model, config = released(tmp_path, vocab_size=300)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config))
    assert load_model(tmp_path / "csp").tokenizer is None  # a 300-token model without its files
    write_bpe(tmp_path / "tok")
    assert load_model(tmp_path / "csp", tokenizer=tmp_path / "tok").tokenizer.encode("self") == [258]
    monkeypatch.setenv("CIRCUITIR_TOKENIZER", str(tmp_path / "tok"))
    assert load_model(tmp_path / "csp").tokenizer.vocab_size == 263
    monkeypatch.delenv("CIRCUITIR_TOKENIZER")
    write_bpe(tmp_path / "csp")
    assert load_model(tmp_path / "csp").tokenizer.vocab_size == 263


def test_eval_on_a_release_with_a_bpe_tokenizer(tmp_path, capsys):
    model, config = released(tmp_path, vocab_size=300, block_size=64)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config))
    write_bpe(tmp_path / "tok")
    assert main(["eval", str(tmp_path / "csp"), "--task", "quotes", "-n", "8", "--json",
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["n"] == 8 and 0 < row["loss"] < 10


def test_tiktoken_downloads_nothing(tmp_path):
    # Build the tokenizer in a process whose network access fails loudly.
    write_bpe(tmp_path / "tok")
    code = ("import socket\n"
            "def refuse(*a, **k): raise RuntimeError('network used')\n"
            "socket.socket.connect = refuse\n"
            "socket.create_connection = refuse\n"
            "from circuitir.models.tokenizer import DataGymTokenizer\n"
            f"print(DataGymTokenizer({str(tmp_path / 'tok')!r}).encode('self'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[258]"


def test_every_built_in_task_is_measurable_under_a_bpe(tmp_path):
    # Their answers are single characters, one byte token each under any data-gym BPE: none collide.
    from circuitir.tasks import TASKS
    write_bpe(tmp_path / "tok")
    tokenizer = DataGymTokenizer(tmp_path / "tok")
    for task in TASKS.values():
        task.check_tokenizer(tokenizer)


def test_a_built_in_task_whose_answers_collide_under_the_bpe_is_one_line(tmp_path, capsys, monkeypatch):
    """A task whose answers start with the same BPE token ("self" and "self.x" are both [self] first) is
    refused before any work by every command that measures it: one line naming the answers and the token."""
    import random

    from circuitir.tasks import TASKS, Task, pair

    def make_pair(rng: random.Random):
        name = f"v{rng.randrange(10 ** 6)}"
        return pair((f"x = {name}\n", "self", ""), (f"y = {name}\n", "self.x", ""))

    monkeypatch.setitem(TASKS, "selfish", Task("selfish", "self or self.x", make_pair))
    model, config = released(tmp_path, vocab_size=300, block_size=64)
    write_openai_release(tmp_path / "csp", model, openai_config_json(config))
    write_bpe(tmp_path / "tok")
    tok = str(tmp_path / "tok")
    for argv in (["eval", str(tmp_path / "csp"), "--task", "selfish", "--tokenizer", tok],
                 ["extract", str(tmp_path / "csp"), "--task", "selfish", "--tokenizer", tok,
                  "-o", str(tmp_path / "c.cir")]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert "task selfish: answers 'self' and 'self.x' both start with the token 'self'" in err
    assert not (tmp_path / "c.cir").exists()
