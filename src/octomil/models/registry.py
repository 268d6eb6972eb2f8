"""Model aliases from ``configs/models.yaml`` and how each one is found on this machine."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from octomil.models.errors import ModelNotAvailableError


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: an embedded package file, a HF repo, or a local path."""

    name: str
    description: str = ""
    hf_repo: str | None = None
    package: str | None = None
    package_file: str | None = None
    install_hint: str | None = None
    local_path: Path | None = None

    @property
    def is_embedded(self) -> bool:
        return self.package is not None


@cache
def _catalog() -> dict:
    text = resources.files("octomil").joinpath("configs/models.yaml").read_text()
    return yaml.safe_load(text)


def default_model_name() -> str:
    return str(_catalog()["default"])


def aliases() -> dict[str, ModelSpec]:
    specs = {}
    for name, entry in _catalog()["models"].items():
        embedded = entry.get("embedded") or {}
        specs[name] = ModelSpec(
            name=name,
            description=entry.get("description", ""),
            hf_repo=entry.get("hf"),
            package=embedded.get("package"),
            package_file=embedded.get("file"),
            install_hint=embedded.get("pip"),
        )
    return specs


def resolve(name: str | None) -> ModelSpec:
    """Turn an alias, a local directory/GGUF file, or a HF repo id into a :class:`ModelSpec`."""
    name = name or default_model_name()
    known = aliases()
    if name in known:
        return known[name]
    path = Path(name).expanduser()
    if path.exists():
        return ModelSpec(name=path.name, local_path=path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelSpec(name=name, hf_repo=name)
    raise ModelNotAvailableError(
        f"unknown model {name!r}: use an alias ({', '.join(known)}), a local model directory "
        "or .gguf file, or a Hugging Face repo id such as mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    )


def embedded_file(spec: ModelSpec) -> Path:
    """Path of an embedded model's weight file inside its installed package."""
    assert spec.package and spec.package_file
    # Located without importing: the package's __init__ imports dependencies we do not install.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model {spec.name!r} ships in the Python package {spec.package!r}, which is not "
            f"installed: run `{spec.install_hint}` (or `make setup`)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.package_file
    if not path.exists():
        raise ModelNotAvailableError(f"model {spec.name!r}: {path} is missing from its package")
    return path


def is_available_offline(spec: ModelSpec) -> bool:
    """True when the model loads without the network (embedded, local, or in the HF cache)."""
    if spec.local_path is not None:
        return spec.local_path.exists()
    if spec.is_embedded:
        try:
            embedded_file(spec)
        except ModelNotAvailableError:
            return False
        return True
    from octomil.models.hub import cached_snapshot

    return cached_snapshot(spec.hf_repo or spec.name) is not None
