"""``GET/POST /admin/early-exit``: the early-exit kill switch, behind the admin key.

``AccessMiddleware`` has already checked the admin key (401 without or with a wrong one, 403 for
an API key or when no admin key is configured). A POST changes the state at once for requests
that start afterwards; requests in flight keep the settings they started with.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from octomil.config import SpeedQuality, resolve_early_exit
from octomil.server import serving
from octomil.server.errors import APIError
from octomil.server.protocol import Bool, Float
from octomil.server.protocol_responses import ErrorResponse

router = APIRouter()
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 503)}


class EarlyExitChange(BaseModel):
    """What to change; omitted fields stay as they are. A preset wins over a threshold."""

    model_config = ConfigDict(extra="forbid")

    enabled: Bool | None = Field(None, description="false: every request at full depth.")
    speed_quality: SpeedQuality | None = Field(None, description="New default preset.")
    threshold: Float | None = Field(None, ge=0.0, le=1.0, description="New default threshold.")
    min_layers: Float | None = Field(None, gt=0.0, le=1.0, description="With threshold.")


def _who(raw: Request) -> str:
    caller = raw.scope.get("state", {}).get("caller", "admin")
    host = raw.client.host if raw.client else "unknown"
    return f"{caller}@{host}"


@router.get("/admin/early-exit", responses=_ERRORS)
async def get_early_exit(raw: Request) -> dict:
    return serving.get_state(raw).control.as_dict()


@router.post("/admin/early-exit", responses=_ERRORS)
async def set_early_exit(change: EarlyExitChange, raw: Request) -> dict:
    control = serving.get_state(raw).control
    settings = None
    if change.speed_quality is not None or change.threshold is not None:
        settings = resolve_early_exit(
            preset=change.speed_quality,
            threshold=change.threshold,
            min_layers_fraction=change.min_layers,
        )
    elif change.min_layers is not None:
        raise APIError(
            400, "min_layers needs a threshold", param="min_layers", code="invalid_value"
        )
    if change.enabled and not (settings or control.default).enabled:
        raise APIError(
            400,
            "early exit has no default settings to switch on: send speed_quality or threshold",
            param="enabled",
            code="invalid_value",
        )
    if settings is None and change.enabled is None:
        raise APIError(400, "nothing to change", code="invalid_value")
    control.change(_who(raw), enabled=change.enabled, settings=settings)
    return control.as_dict()
