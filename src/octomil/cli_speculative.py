"""``--speculative MODE`` and ``--num-speculative-tokens K``, shared by ``serve`` and ``eval``.

Checked before anything loads, with one ``error:`` line naming the flag. ``self`` (drafts from
the model's own early layers) is refused with the measurement that rules it out on this model.
"""

from __future__ import annotations

from typing import Any

from octomil.cli_common import check_model
from octomil.config import ConfigError

MODES = ("off", "lookup", "auto")
MAX_TOKENS = 12
SELF_REFUSED = (
    "--speculative self is not offered: drafts from early layers through the calibrated exit "
    "adapters agree with the full model on 24-31% of tokens on the embedded model (1.3-1.44 "
    "tokens per verification), a net slow-down; use lookup or auto"
)


def draft_model_name(mode: str) -> str | None:
    """NAME of ``model:NAME``, else None."""
    name = mode.removeprefix("model:")
    return name if name != mode else None


def check_speculative(mode: str, num_tokens: int) -> None:
    if mode == "self":
        raise ConfigError(SELF_REFUSED)
    name = draft_model_name(mode)
    if name is not None:
        if not name:
            raise ConfigError("--speculative model:NAME needs a model name or path")
        check_model(name)
    elif mode not in MODES:
        raise ConfigError(
            f"--speculative must be one of {', '.join(MODES)} or model:NAME, got {mode!r}"
        )
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ConfigError(
            f"--num-speculative-tokens must be within 1..{MAX_TOKENS}, got {num_tokens}"
        )


def speculative_settings(flags: Any) -> Any:
    from octomil.engine.speculation import SpeculativeSettings

    return SpeculativeSettings(flags.speculative, flags.num_speculative_tokens)
