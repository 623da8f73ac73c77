"""Find a model's files on disk: a local dir, a hub snapshot, or a random-init model built once."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from spectraqlora.config import ModelConfig
from spectraqlora.errors import UserError

# What a training run needs from a hub repo: weights as safetensors, configs, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def resolve(model: ModelConfig, patterns: list[str] = HUB_PATTERNS) -> Path:
    """Local directory holding `model.name_or_path`, fetched or built if need be."""
    path = Path(os.path.expanduser(model.name_or_path))
    if path.is_dir():
        return path
    if model.random_init is not None:
        return _build_random_init(model, path)
    if path.is_absolute() or model.name_or_path.startswith((".", "~")) or len(path.parts) > 2:
        raise UserError(f"model.name_or_path={model.name_or_path}: no such directory")
    return _download(model.name_or_path, model.revision, patterns)


def num_layers(path: Path) -> int | None:
    """The number of transformer layers its config.json names, when it names one."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    return next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise UserError(
            f"model '{repo_id}' is neither in the local Hugging Face cache nor reachable on the "
            f"hub (HF_HUB_OFFLINE={offline}); download it where the hub answers, or set "
            f"model.name_or_path=<local checkpoint dir>"
        ) from exc
    except HfHubHTTPError as exc:  # gated repo, bad token, unknown id
        first = str(exc).splitlines()[0]
        raise UserError(f"model '{repo_id}' could not be fetched from the hub: {first}") from exc


def _build_random_init(model: ModelConfig, path: Path) -> Path:
    """Save a random-init model (seed 0) and its tokenizer at `path`, atomically, once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(model.random_init)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer)
    if tokenizer.eos_token is None:  # a WordPiece (BERT) tokenizer: its [SEP] ends a text
        tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: the sharded index's files, or every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{directory} holds no *.safetensors weights (convert .bin checkpoints with "
            f"save_pretrained(..., safe_serialization=True))"
        )
    return files
