"""Find a model's files on disk: a local dir, a hub snapshot, or a random-init model built once."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from spectraqlora.config import ModelConfig
from spectraqlora.errors import UserError
from spectraqlora.store import rundir

log = logging.getLogger(__name__)

# What a training run needs from a hub repo: weights as safetensors, configs, tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
GGUF_MARK = "gguf.json"  # in a checkpoint converted from a GGUF: which file, its sha256


def resolve(model: ModelConfig, patterns: list[str] = HUB_PATTERNS) -> Path:
    """Local directory holding `model.name_or_path`, fetched or built if need be."""
    path = Path(os.path.expanduser(model.name_or_path))
    if model.gguf_file:
        return _from_gguf(Path(model.gguf_file).expanduser(), path)
    if path.is_dir():
        return path
    if model.random_init is not None:
        return _build_random_init(model, path)
    if path.is_absolute() or model.name_or_path.startswith((".", "~")) or len(path.parts) > 2:
        raise UserError(f"model.name_or_path={model.name_or_path}: no such directory")
    return _download(model.name_or_path, model.revision, patterns)


# A tokenizer's vocabulary under the names transformers saves it (fast, sentencepiece, WordPiece,
# byte-level BPE, tiktoken): a dir with none of them cannot give a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.txt", "vocab.json")


def check_dir(path: Path, model: ModelConfig, files: list[Path]) -> None:
    """What a checkpoint dir holds, before anything loads from it: every weight file whole (its
    header and the bytes it describes) and tokenizer files, unless model.tokenizer names another
    source. Each gap is one line naming the files and the fix."""
    from spectraqlora.store.tensors import read_header

    for file in files:
        read_header(file)  # a cut or corrupt file: one line naming it
    if model.tokenizer is None and not any((path / name).is_file() for name in TOKENIZER_FILES) \
            and not any(path.glob("*.tiktoken")):
        raise UserError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): copy them "
                        f"from the model it was trained from, or set model.tokenizer=<hub id or dir>")


def num_layers(path: Path) -> int | None:
    """The number of transformer layers its config.json names, when it names one."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    return next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)


GATED = ("meta-llama/", "google/gemma", "mistralai/Mistral-Large")  # hub repos behind a licence form


def _gated_note(repo_id: str) -> str:
    if not repo_id.startswith(GATED):
        return ""
    return (f"; it is gated: accept its licence on https://huggingface.co/{repo_id} and give a token "
            f"(HF_TOKEN=... or `hf auth login`)")


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
            f"model.name_or_path=<local checkpoint dir>" + _gated_note(repo_id)
        ) from exc
    except HfHubHTTPError as exc:  # gated repo, bad token, unknown id
        first = str(exc).splitlines()[0]
        raise UserError(f"model '{repo_id}' could not be fetched from the hub: {first}" + _gated_note(repo_id)) from exc


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
    with rundir.building(path) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _from_gguf(gguf: Path, path: Path) -> Path:
    """The safetensors checkpoint at `path` converted from a GGUF file (transformers dequantizes
    it to float32): converted once, atomically, with the GGUF's sha256, size and mtime in
    `path/gguf.json`; later runs read `path` like any checkpoint dir (the file is hashed again
    only when its size or mtime changed)."""
    if not gguf.is_file():
        raise UserError(f"model.gguf_file={gguf}: no such file")
    stat = gguf.stat()
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    mark = path / GGUF_MARK
    if mark.is_file():
        done = json.loads(mark.read_text())
        if {k: done.get(k) for k in seen} == seen:  # the same file as converted: no re-hash per run
            return path
        if done["sha256"] == _sha256(gguf):
            return path
        raise UserError(f"model.name_or_path={path} holds a conversion of another GGUF "
                        f"({done['gguf']}): remove it, or set model.name_or_path to a new dir "
                        f"for {gguf.name}")
    if path.exists() and any(path.iterdir()):
        raise UserError(f"model.name_or_path={path} is not empty and not converted from "
                        f"model.gguf_file: set model.name_or_path to a new dir for {gguf.name}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (once) into a safetensors checkpoint at %s", gguf.name, path)
    began = time.perf_counter()
    try:
        net = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise UserError(f"model.gguf_file={gguf}: transformers cannot load it "
                        f"({str(exc).splitlines()[0]})") from None
    net.hf_quantizer = None  # dequantized: save it as the float checkpoint it now is
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
    with rundir.building(path) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_MARK).write_text(json.dumps({"gguf": str(gguf), "sha256": _sha256(gguf), **seen,
                                                 "dequantized_to": "float32"}, indent=2) + "\n")
    log.info("converted %s in %.0f s (dequantized to float32: close to, not equal to, the "
             "original weights)", gguf.name, time.perf_counter() - began)
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
