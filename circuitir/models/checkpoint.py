"""Loading and saving models without ever unpickling arbitrary objects.

Two formats load:

* circuitir checkpoints: one ``torch.save`` of a dict of tensors and plain
  values (config, tokenizer spec, recipe, corpus hash, metrics, optimiser
  state), read back with ``weights_only=True``;
* OpenAI's releases: a directory with ``beeg_config.json`` and
  ``final_model.pt`` (a bare state dict), or that ``.pt`` with the JSON beside it.

OpenAI's reference ``GPT`` registers three buffers. ``final_logits_bias`` and
``bigram_table`` (a buffer when the table is not learnable) are part of the
model and load as such; ``transformer.h.{i}.attn.bias``, the causal mask a
model built with ``flash=False`` carries (shape ``(1, 1, block_size,
block_size)``, lower-triangular ones), is not a weight: it is checked to be
exactly that mask and dropped, since circuitir builds the same mask from the
sequence length. A mask that is anything else is refused (it would change
which tokens attend to which). Config fields: see :mod:`circuitir.models.config`.

Both circuitir formats have a safetensors twin: a path ending in
``.safetensors`` saves the weights there with config, tokenizer and the
plain metadata as JSON strings in the file's metadata (no optimiser state,
so such a file cannot resume training), and loads back the same way.

Every write goes to a temporary file in the target directory and is renamed
into place, so an interrupted save never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from circuitir.errors import UserError
from circuitir.models.config import GPTConfig
from circuitir.models.gpt import SparseGPT
from circuitir.models.tokenizer import openai_tokenizer, tokenizer_from_spec

FORMAT = "circuitir-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: SparseGPT
    tokenizer: object
    sha256: str
    path: str
    meta: dict = field(default_factory=dict)  # recipe, corpus, seed, metrics, step, ...

    @property
    def config(self) -> GPTConfig:
        return self.model.config


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    os.close(handle)
    try:
        yield Path(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no such checkpoint: {path}") from None
    except pickle.UnpicklingError as exc:
        # torch's own text advises weights_only=False, which would run the file's code: never. Say it plainly.
        if "allowed global" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(f"cannot read checkpoint {path}: it holds Python objects, not only tensors and plain "
                            "values, and loading it could run code, which circuitir never does (re-download the "
                            "model from a source you trust, or re-train it)") from None
        raise UserError(f"cannot read checkpoint {path}: it is damaged or not a torch file (re-download or "
                        "re-train it)") from None
    except Exception as exc:  # truncated zip, not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path}: {first[:200]} (is it a complete circuitir or "
                        "OpenAI model file? re-download or re-train it)") from None


CAUSAL_MASK_SUFFIX = ".attn.bias"


def _drop_causal_masks(config: GPTConfig, state_dict: dict, path: Path) -> dict:
    """Remove OpenAI's ``transformer.h.{i}.attn.bias`` buffers after checking each is the causal mask."""
    out = {}
    for key, value in state_dict.items():
        layer = key[len("transformer.h."):-len(CAUSAL_MASK_SUFFIX)] if isinstance(key, str) else ""
        if not (isinstance(key, str) and key.startswith("transformer.h.") and key.endswith(CAUSAL_MASK_SUFFIX)
                and layer.isdigit()):
            out[key] = value
            continue
        size = config.block_size
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (1, 1, size, size):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"checkpoint {path} does not fit its config ({key} is {found}, a causal mask for "
                            f"block_size {size} is {(1, 1, size, size)})")
        if not torch.equal(value[0, 0] != 0, torch.ones(size, size, dtype=torch.bool).tril()):
            raise UserError(f"checkpoint {path}: {key} is not the causal mask (lower-triangular ones); "
                            "circuitir only runs causal attention")
    return out


def _build(config: GPTConfig, state_dict: dict, path: Path) -> SparseGPT:
    if not isinstance(state_dict, dict):
        raise UserError(f"checkpoint {path} holds no state dict of weights")
    # The shapes the config gives, on the meta device: nothing is allocated until the weights fit them
    # (a config with d_model 2^20 would otherwise ask for hundreds of GB before any check).
    with torch.device("meta"):
        expected = SparseGPT(config).state_dict()
    state_dict = _drop_causal_masks(config, dict(state_dict), path)
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and key in expected:
            if not (value.dtype.is_floating_point or value.dtype == torch.bool) or value.is_complex():
                raise UserError(f"checkpoint {path}: {key} holds {value.dtype} values, not floating-point weights")
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                raise UserError(f"checkpoint {path}: {key} holds NaN or infinite values (a diverged or damaged "
                                "model); circuitir reads finite weights only")
        # load_state_dict reports a wrong shape as a RuntimeError; it is the user's file that is wrong.
        if key in expected and (not isinstance(value, torch.Tensor) or value.shape != expected[key].shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"checkpoint {path} does not fit its config ({key} is {found}, the config "
                            f"gives {tuple(expected[key].shape)}); check that the config file belongs "
                            "to these weights")
    missing = [key for key in expected if key not in state_dict and key != "final_logits_bias"
               and not (config.tied_unembed and key in ("lm_head.weight", "transformer.wte.weight"))]
    if missing:
        raise UserError(f"checkpoint {path} does not fit its config (missing {missing[:3]}); "
                        "check that the config file belongs to these weights")
    model = SparseGPT(config)
    state_dict.setdefault("final_logits_bias", torch.zeros(config.vocab_size))
    if config.tied_unembed:
        state_dict.setdefault("lm_head.weight", state_dict.get("transformer.wte.weight"))
        state_dict.setdefault("transformer.wte.weight", state_dict.get("lm_head.weight"))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"checkpoint {path} does not fit its config ({detail}); "
                        "check that the config file belongs to these weights")
    model.eval()
    return model


def load_model(path: str | Path, tokenizer: str | Path | None = None) -> LoadedModel:
    """Load a circuitir checkpoint or an OpenAI release (directory, or .pt with its JSON beside it).

    ``tokenizer``: a directory with ``vocab.bpe`` and ``encoder.json`` for a release whose config
    names a BPE (``tokenizer_name``); without it, $CIRCUITIR_TOKENIZER, $TINYPYTHON_TOK_DIR or the
    release directory itself are tried, and a model with more than 256 tokens comes back with
    ``tokenizer=None`` when none holds the files."""
    path = Path(path)
    if path.is_dir():
        return _load_openai(path / "beeg_config.json", path / "final_model.pt", tokenizer_dir=tokenizer)
    if not path.exists():
        raise UserError(f"no such checkpoint: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    raw = _torch_load(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        if raw.get("version") != FORMAT_VERSION:
            raise UserError(f"checkpoint {path} has format version {raw.get('version')}, "
                            f"this circuitir reads version {FORMAT_VERSION}")
        config = GPTConfig.from_dict(raw.get("config"))
        spec = raw.get("tokenizer")
        if spec is not None and not isinstance(spec, dict):
            raise UserError(f"checkpoint {path}: its tokenizer spec is a {type(spec).__name__}, not a table such "
                            "as {'kind': 'bytes'}")
        model = _build(config, raw.get("state_dict"), path)
        meta = {k: v for k, v in raw.items() if k not in ("state_dict", "optimizer")}
        return LoadedModel(model, tokenizer_from_spec(spec), file_sha256(path), str(path), meta)
    config_path = path.with_name("beeg_config.json")
    if isinstance(raw, dict) and config_path.exists():
        return _load_openai(config_path, path, state_dict=raw, tokenizer_dir=tokenizer)
    raise UserError(f"{path} is not a circuitir checkpoint, and there is no beeg_config.json beside it "
                    "to read it as an OpenAI release")


def _load_openai(config_path: Path, weights_path: Path, state_dict: dict | None = None,
                 tokenizer_dir: str | Path | None = None) -> LoadedModel:
    if not config_path.exists():
        raise UserError(f"no config at {config_path} (an OpenAI release directory holds beeg_config.json "
                        "and final_model.pt)")
    try:
        raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{config_path}: not UTF-8 text (byte {exc.start}); a config is a JSON file") from None
    except OSError as exc:
        raise UserError(f"cannot read {config_path}: {exc.strerror}") from None
    config = GPTConfig.from_openai(raw_config)
    if state_dict is None:
        if not weights_path.exists():
            raise UserError(f"no such checkpoint: {weights_path}")
        state_dict = _torch_load(weights_path)
    model = _build(config, state_dict, weights_path)
    tokenizer = openai_tokenizer(config.extra.get("tokenizer_name"), config.vocab_size, tokenizer_dir,
                                 beside=config_path.parent)
    return LoadedModel(model, tokenizer, file_sha256(weights_path), str(weights_path),
                       {"source": "openai", "config": config.to_dict()})


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("the safetensors package is needed for .safetensors models (pip install safetensors)") \
            from None
    return safetensors


def _load_safetensors(path: Path) -> LoadedModel:
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # a truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a circuitir safetensors checkpoint (its metadata has no "
                        f"format={FORMAT}); save one with `circuitir export M.pt --format safetensors`")
    try:
        config, spec, meta = (json.loads(metadata.get(k, "null")) for k in ("config", "tokenizer", "meta"))
    except json.JSONDecodeError:
        raise UserError(f"checkpoint {path}: its metadata is not valid JSON") from None
    model = _build(GPTConfig.from_dict(config), state_dict, path)
    return LoadedModel(model, tokenizer_from_spec(spec), file_sha256(path), str(path), dict(meta or {}))


def save_checkpoint(path: str | Path, model: SparseGPT, tokenizer, **meta) -> str:
    """Write a circuitir checkpoint atomically (safetensors when the path ends so); returns its SHA-256."""
    if Path(path).suffix == ".safetensors":
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if model.config.tied_unembed:  # one tensor stored once; loading ties it again
            state.pop("lm_head.weight")
        meta.pop("optimizer", None)
        metadata = {"format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(model.config.to_dict()),
                    "tokenizer": json.dumps(tokenizer.spec), "meta": json.dumps(meta)}
        with atomic_path(path) as temp:
            _safetensors().torch.save_file(state, str(temp), metadata=metadata)
        return file_sha256(path)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
               "tokenizer": tokenizer.spec, "state_dict": model.state_dict(), **meta}
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return file_sha256(path)


def strip_for_release(source: str | Path, target: str | Path) -> str:
    """Copy a checkpoint without its optimiser state (a third of the size; it can no longer resume)."""
    raw = _torch_load(Path(source))
    if not (isinstance(raw, dict) and raw.get("format") == FORMAT):
        raise UserError(f"{source} is not a circuitir checkpoint")
    raw.pop("optimizer", None)
    with atomic_path(target) as temp:
        torch.save(raw, temp)
    return file_sha256(target)


if __name__ == "__main__":  # python -m circuitir.models.checkpoint strip IN OUT
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "strip":
        sys.exit("usage: python -m circuitir.models.checkpoint strip IN.pt OUT.pt")
    print(strip_for_release(sys.argv[2], sys.argv[3]))
