"""Exit-policy directories: where they live, what their manifest says, which weights they fit.

An exit policy is what ``octomil calibrate`` produces for one model: trained exit adapters (and
gate probes) as ``weights.safetensors`` plus ``manifest.json`` (model id, weight hash, layers,
per-preset placement and thresholds, disagreement budgets, held-out measurements, timings, creation
date, octomil version). The engine finds one for the loaded model in this order:

1. an explicit path (``--exit-policy DIR`` / ``OCTOMIL_EXIT_POLICY``);
2. the user cache, ``$OCTOMIL_CACHE/policies/<model>/`` (default ``~/.cache/octomil``), where
   ``octomil calibrate`` writes by default;
3. policies shipped in the package, ``octomil/policies/<model>/``.

A policy is tied to the weights it was trained on by a SHA-256 of the model's weight files: one made
for other weights is refused with a clear error (explicit path) or skipped with a warning (found).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from octomil.user_cache import cache_dir

FORMAT = "octomil-exit-policy"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
# --exit-policy values that name no directory.
LENS = "lens"  # the raw shared head, no adapters (the pre-calibration behaviour)
NONE = "none"  # never exit early
ENV_VAR = "OCTOMIL_EXIT_POLICY"
_HASH_CHUNK = 1 << 20


class ExitPolicyError(ValueError):
    """An exit policy cannot be used (missing, malformed, or made for other weights); one line."""


@dataclass(frozen=True)
class PresetPlacement:
    """Where one preset checks for exits, and how, with what calibration measured for it."""

    threshold: float  # nats of the adapter distribution (the preset's documented value)
    min_layers: int
    budget: float  # allowed disagreement with full depth (fraction of tokens)
    method: str  # "entropy" | "probe" | "lowrank"
    layers: tuple[int, ...]  # 1-based depths; empty: full depth pays best
    margin: float = 0.0  # gate slack (nats of log-entropy) for "probe" / "lowrank"
    measured: dict[str, Any] = field(default_factory=dict)  # held-out: disagreement, avg layers...
    methods: dict[str, Any] = field(default_factory=dict)  # every method's best placement
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "min_layers": self.min_layers,
            "budget": self.budget,
            "method": self.method,
            "layers": list(self.layers),
            "margin": self.margin,
            "measured": self.measured,
            "methods": self.methods,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PresetPlacement:
        return cls(
            threshold=float(d["threshold"]),
            min_layers=int(d["min_layers"]),
            budget=float(d["budget"]),
            method=str(d["method"]),
            layers=tuple(int(x) for x in d["layers"]),
            margin=float(d.get("margin", 0.0)),
            measured=dict(d.get("measured", {})),
            methods=dict(d.get("methods", {})),
            note=str(d.get("note", "")),
        )


@dataclass(frozen=True)
class Manifest:
    model_id: str
    weights_sha256: str
    total_layers: int
    hidden_size: int
    adapter_layers: tuple[int, ...]  # 1-based depths with a trained adapter (and probe)
    presets: dict[str, PresetPlacement]
    created: str
    octomil_version: str
    probe_hidden: int = 0
    lowrank_rank: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    # The weight format the policy was calibrated at: exits react to the format's rounding, so
    # ``--dtype auto`` serves a compact format only where a policy of that format exists.
    weights_format: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "total_layers": self.total_layers,
            "hidden_size": self.hidden_size,
            "adapter_layers": list(self.adapter_layers),
            "probe_hidden": self.probe_hidden,
            "lowrank_rank": self.lowrank_rank,
            "presets": {k: v.to_json() for k, v in self.presets.items()},
            "timings_ms": self.timings_ms,
            "heldout": self.heldout,
            "calibration": self.calibration,
            "weights_format": self.weights_format,
            "created": self.created,
            "octomil_version": self.octomil_version,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise ExitPolicyError(f"not an octomil exit policy (format {d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ExitPolicyError(
                f"exit policy format {d['format_version']} is newer than this octomil supports "
                f"({FORMAT_VERSION}); upgrade octomil or re-run `octomil calibrate`"
            )
        return cls(
            model_id=str(d["model_id"]),
            weights_sha256=str(d["weights_sha256"]),
            total_layers=int(d["total_layers"]),
            hidden_size=int(d["hidden_size"]),
            adapter_layers=tuple(int(x) for x in d["adapter_layers"]),
            presets={k: PresetPlacement.from_json(v) for k, v in d["presets"].items()},
            created=str(d["created"]),
            octomil_version=str(d["octomil_version"]),
            probe_hidden=int(d.get("probe_hidden", 0)),
            lowrank_rank=int(d.get("lowrank_rank", 0)),
            timings_ms={k: float(v) for k, v in d.get("timings_ms", {}).items()},
            heldout=dict(d.get("heldout", {})),
            calibration=dict(d.get("calibration", {})),
            weights_format=str(d.get("weights_format", "float32")),  # older policies: fp32
        )


def read_manifest(path: Path) -> Manifest:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ExitPolicyError(f"{path} is not an exit-policy directory (no {MANIFEST})")
    try:
        return Manifest.from_json(json.loads(file.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ExitPolicyError):
            raise
        raise ExitPolicyError(f"malformed exit policy manifest {file}: {exc!r}") from None


def write_manifest(path: Path, manifest: Manifest) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / MANIFEST).write_text(
        json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n"
    )


# --- which weights --------------------------------------------------------------------------------


def _weight_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    files = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.gguf"))
    return files


def weights_hash(source: str | Path) -> str:
    """SHA-256 over the model's weight files (name-independent for one file; names + bytes for a
    directory). Cached per (path, size, mtime) under the user cache, so large models hash once."""
    source = Path(source)
    files = _weight_files(source)
    if not files:
        return "unknown"
    key = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    cache_file = cache_dir() / "weight-hashes.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return str(cached[key])
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        cached[key] = digest
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only home only costs re-hashing
    return digest


# --- where policies live --------------------------------------------------------------------------


def user_policy_dir(model_id: str) -> Path:
    return cache_dir() / "policies" / _safe(model_id)


def packaged_policy_dir(model_id: str) -> Path | None:
    try:
        d = resources.files("octomil").joinpath("policies", _safe(model_id))
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return Path(str(d)) if d.is_dir() else None


def candidate_dirs(model_id: str) -> list[Path]:
    """Where a policy for ``model_id`` is looked for, in order (existing directories only)."""
    found = [user_policy_dir(model_id), packaged_policy_dir(model_id)]
    return [d for d in found if d is not None and (d / MANIFEST).is_file()]


def _safe(model_id: str) -> str:
    return model_id.replace("/", "--")
