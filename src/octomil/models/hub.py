"""Hugging Face Hub access that fails fast and clearly when the network is not there."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from octomil.models.errors import ModelNotAvailableError

_HUB_HOST = "huggingface.co"
# Weights and tokenizer files mlx-lm needs from a repo.
_ALLOW = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def cached_snapshot(repo: str) -> Path | None:
    """Local snapshot of ``repo`` in the HF cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo, allow_patterns=_ALLOW, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None
    return path if any(path.glob("*.safetensors")) else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch(repo: str, alias: str | None = None) -> Path:
    """Return a local snapshot of ``repo``, downloading it only when the hub is reachable."""
    local = cached_snapshot(repo)
    if local is not None:
        return local
    label = f"{alias!r} ({repo})" if alias and alias != repo else repo
    hint = (
        f"download it where the network allows (`huggingface-cli download {repo}`) and copy the "
        "HF cache here, or pass a local model directory"
    )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotAvailableError(
            f"model {label} is not available offline (not in the local cache, "
            f"HF_HUB_OFFLINE=1): {hint}"
        )
    if not _hub_reachable():
        raise ModelNotAvailableError(
            f"model {label} is not available offline and {_HUB_HOST} is unreachable: {hint}"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=_ALLOW))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        raise ModelNotAvailableError(f"could not download model {label}: {exc}") from None
