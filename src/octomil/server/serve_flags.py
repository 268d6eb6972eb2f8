"""``octomil serve``'s settings: the flags resolved into :class:`ServeFlags` and checked.

Every flag is checked before anything loads (:meth:`ServeFlags.check`), so a user error ends the
command with one ``error:`` line before the model is read. :func:`serve_flags` maps the command's
parameters (by name) to the settings, for the CLI and for a Ray Serve application alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from octomil.cli_common import check_dtype, check_exit_policy, check_log_level, check_model
from octomil.cli_speculative import check_speculative
from octomil.config import ConfigError, EarlyExitSettings, SpeedQuality, resolve_early_exit
from octomil.server.heap_trim import DEFAULT_INTERVAL_S

PRESET_NAMES = ", ".join(p.value for p in SpeedQuality)
# Measured on this repository's 2-core CPU (benchmarks/serve_bench.py, serve_time_split.py; README
# "Serving benchmark").
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_PREFILL_CHUNK = 32  # serve_time_split.py: 64 gave the same tok/s at 1.5x the p95 ITL


@dataclass(frozen=True)
class ServeFlags:
    """``octomil serve``'s flags, resolved. A new flag: a field here and a line in check()."""

    model: str | None
    settings: EarlyExitSettings
    host: str
    port: int
    api_key: str | None
    max_concurrency: int
    max_batch_size: int
    max_prefill_tokens_per_step: int
    max_kv_tokens: int | None
    shutdown_timeout: float
    default_max_tokens: int
    telemetry_headers: bool
    dtype: str
    exit_policy: str | None
    log_level: str
    # Keys, limits and logs (octomil.server.access, .limits, .request_context).
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    rate_limit: str | None = None
    max_streams_per_key: int | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_messages: int | None = None
    request_timeout: float | None = None
    log_format: str = "text"
    allow_aggressive_overrides: bool = False
    policy_file: str | None = None
    shadow_rate: float = 0.0
    auto_fallback: bool = False
    drift_window: int = 200
    drift_margin: float = 0.05
    heap_trim_interval: float = DEFAULT_INTERVAL_S
    drift_budget: float | None = None
    speculative: str = "off"
    num_speculative_tokens: int = 8

    def check(self) -> None:
        """Every check that needs no model; raises ConfigError naming the flag."""
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be within 1..65535, got {self.port}")
        for flag, value in (
            ("--max-concurrency", self.max_concurrency),
            ("--max-batch-size", self.max_batch_size),
            ("--max-prefill-tokens-per-step", self.max_prefill_tokens_per_step),
            ("--max-kv-tokens", 1 if self.max_kv_tokens is None else self.max_kv_tokens),
            ("--default-max-tokens", self.default_max_tokens),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
        check_log_level(self.log_level)
        check_dtype(self.dtype)
        check_model(self.model)
        check_exit_policy(self.exit_policy)
        check_speculative(self.speculative, self.num_speculative_tokens)
        self.check_ops()

    def check_ops(self) -> None:
        from octomil.server.limits import Rate
        from octomil.server.request_context import LOG_FORMATS

        for flag, limit in (
            ("--max-streams-per-key", self.max_streams_per_key),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-prompt-tokens", self.max_prompt_tokens),
            ("--max-tokens-limit", self.max_tokens_limit),
            ("--max-messages", self.max_messages),
        ):
            if limit is not None and limit < 1:
                raise ConfigError(f"{flag} must be >= 1, got {limit}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be > 0, got {self.request_timeout}")
        if self.rate_limit is not None:
            Rate.parse(self.rate_limit)
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise ConfigError(f"--shadow-rate must be within [0, 1], got {self.shadow_rate}")
        if self.auto_fallback and self.shadow_rate == 0.0:
            raise ConfigError("--auto-fallback needs shadow checks: set --shadow-rate")
        if self.drift_window < 1:
            raise ConfigError(f"--drift-window must be >= 1, got {self.drift_window}")
        if self.heap_trim_interval < 0:
            raise ConfigError(
                f"--heap-trim-interval must be >= 0 (0: never), got {self.heap_trim_interval}"
            )
        if not 0.0 <= self.drift_margin <= 1.0:
            raise ConfigError(f"--drift-margin must be within [0, 1], got {self.drift_margin}")
        if self.drift_budget is not None and not 0.0 <= self.drift_budget <= 1.0:
            raise ConfigError(f"--drift-budget must be within [0, 1], got {self.drift_budget}")
        if self.policy_file is not None:
            from octomil.policy_file import load_policy_file

            load_policy_file(self.policy_file)
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ConfigError("--admin-key must differ from every API key")


def serve_flags(p: Mapping[str, Any]) -> ServeFlags:
    """The settings of ``octomil serve`` from its parameters by name (the CLI's own, or those
    its click command parses for a Ray Serve application)."""

    return ServeFlags(
        model=p["model"],
        settings=resolve_early_exit(preset=p["speed_quality"], threshold=p["early_exit_threshold"]),
        host=p["host"],
        port=p["port"],
        api_key=None,
        api_keys=_keys(p["api_key"], p["api_keys_file"]),
        admin_key=p["admin_key"] or None,
        rate_limit=p["rate_limit"],
        max_streams_per_key=p["max_streams_per_key"],
        max_body_bytes=p["max_body_bytes"],
        max_prompt_tokens=p["max_prompt_tokens"],
        max_tokens_limit=p["max_tokens_limit"],
        max_messages=p["max_messages"],
        request_timeout=p["request_timeout"],
        log_format=p["log_format"].lower(),
        allow_aggressive_overrides=p["allow_aggressive_overrides"],
        policy_file=p["policy_file"],
        shadow_rate=p["shadow_rate"],
        auto_fallback=p["auto_fallback"],
        drift_window=p["drift_window"],
        drift_margin=p["drift_margin"],
        heap_trim_interval=p["heap_trim_interval"],
        drift_budget=p["drift_budget"],
        max_concurrency=p["max_concurrency"],
        max_batch_size=p["max_batch_size"],
        max_prefill_tokens_per_step=p["max_prefill_tokens_per_step"],
        max_kv_tokens=p["max_kv_tokens"],
        shutdown_timeout=p["shutdown_timeout"],
        default_max_tokens=p["default_max_tokens"],
        telemetry_headers=p["telemetry_headers"],
        dtype=p["dtype"],
        exit_policy=p["exit_policy"],
        log_level=p["log_level"].lower(),
        speculative=p["speculative"],
        num_speculative_tokens=p["num_speculative_tokens"],
    )


def _keys(flags: list[str] | None, file: str | None) -> tuple[str, ...]:
    from octomil.server.keys import read_keys_file

    keys = [k for k in flags or () if k]
    if file:
        keys += read_keys_file(file)
    return tuple(dict.fromkeys(keys))
