"""API keys and the admin key: who is calling, compared in constant time.

Keys come from ``--api-key`` (repeatable) and ``--api-keys-file`` (one key per line; blank lines
and ``#`` comments ignored). A caller is named in logs and limits by a *key id*, the first 8 hex
digits of the key's SHA-256: stable, and useless to anyone who reads the logs. Every comparison
runs ``hmac.compare_digest`` against every configured key, so the time taken does not reveal
which key (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from octomil.config import ConfigError


def key_id(key: str | bytes) -> str:
    raw = key.encode() if isinstance(key, str) else key
    return "key-" + hashlib.sha256(raw).hexdigest()[:8]


def read_keys_file(path: str | Path) -> tuple[str, ...]:
    """The keys of ``path``; a missing file or one with no key is a ConfigError naming it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--api-keys-file {path}: {exc.strerror or exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if any(c.isspace() for c in key):
            raise ConfigError(f"--api-keys-file {path}, line {number}: a key has no spaces")
        keys.append(key)
    if not keys:
        raise ConfigError(f"--api-keys-file {path} holds no key")
    return tuple(keys)


@dataclass(frozen=True)
class KeyRing:
    """The configured keys. No API key: ``/v1/*`` is open. No admin key: ``/admin/*`` is closed."""

    api_keys: tuple[bytes, ...] = ()
    admin_key: bytes | None = None

    @classmethod
    def of(cls, api_keys: tuple[str, ...], admin_key: str | None) -> KeyRing:
        return cls(tuple(k.encode() for k in api_keys), admin_key.encode() if admin_key else None)

    @property
    def open(self) -> bool:
        return not self.api_keys

    def match_api(self, token: bytes) -> bool:
        # No early return: every key is compared, whichever matches.
        found = False
        for key in self.api_keys:
            found |= hmac.compare_digest(token, key)
        return found

    def match_admin(self, token: bytes) -> bool:
        return self.admin_key is not None and hmac.compare_digest(token, self.admin_key)
