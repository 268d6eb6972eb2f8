"""Load-time layout decisions, measured once per machine and then kept.

The loader times which weight layout (native or fp32) and which storage ((out, in) or (in, out))
decode fastest. Every candidate is exact, but they are not bit-identical: different kernels sum in
different orders, and an fp32 rounding difference can flip a greedy token. Timings taken under CPU
load differ from run to run, so deciding afresh at every start would let machine load change the
answers. The first measurement is therefore stored in ``$OCTOMIL_CACHE/layout-decisions.json``,
under a key of everything it depends on (CPU, BLAS, MLX version, device, weight format and
shape), and reused by every later load. Delete the file to measure again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from octomil.user_cache import cache_dir

log = logging.getLogger(__name__)
FILE_NAME = "layout-decisions.json"


def decisions_path() -> Path:
    return cache_dir() / FILE_NAME


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def decide(
    kind: str, key: dict[str, Any], measure: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """The stored decision of ``kind`` for ``key``, or a new one from ``measure()``, stored.

    Returns ``(decision, cached)``. An unwritable cache only costs a measurement per load."""
    path = decisions_path()
    name = f"{kind} {json.dumps(key, sort_keys=True)}"
    stored = _read(path).get(name)
    if isinstance(stored, dict):
        return stored, True
    decision = {**measure(), "decided": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read(path), name: decision}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".layout-", suffix=".json")
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent load reads the old or the new file
    except OSError as exc:
        log.warning("could not store the %s decision in %s: %s", kind, path, exc)
    return decision, False
