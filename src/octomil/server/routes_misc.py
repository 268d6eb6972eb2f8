"""GET /v1/models, /v1/models/{id}, /health, /metrics and /v1/early-exit/stats."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from octomil.server import serving
from octomil.server.errors import APIError, error_response
from octomil.server.metrics import CONTENT_TYPE
from octomil.server.protocol_responses import ErrorResponse, ModelCard, ModelList

router = APIRouter()


def _card(raw: Request, state: serving.ServingState) -> ModelCard:
    engine = state.engine
    return ModelCard(
        id=engine.model_id,
        created=raw.app.state.started_at,
        total_layers=engine.total_layers,
        context_length=engine.context_length,
    )


@router.get("/v1/models", response_model=ModelList, responses={503: {"model": ErrorResponse}})
async def list_models(raw: Request) -> ModelList:
    return ModelList(data=[_card(raw, serving.get_state(raw))])


@router.get(
    "/v1/models/{model:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def retrieve_model(model: str, raw: Request) -> ModelCard:
    """One model card (the SDK's ``client.models.retrieve``); another id is 404 model_not_found.
    ``:path``: hub ids such as ``org/repo`` contain a slash."""
    state = serving.get_state(raw)
    serving.check_model(state, model)
    return _card(raw, state)


# A step decodes one token for the batch plus at most one prompt chunk: seconds, not minutes.
ENGINE_STALL_S = 60.0


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(raw: Request) -> Response:
    """200 once the model is loaded and the engine worker runs; 503 before (and after stop)."""
    if getattr(raw.app.state, "serving", None) is None:
        err = getattr(raw.app.state, "load_error", None)
        message = f"model failed to load: {err}" if err else "the model is still loading"
        return error_response(APIError(503, message, code="model_not_ready"))
    client = raw.app.state.serving.client
    age = client.step_age()
    body = {
        "status": "ok",
        "engine_step_age_s": round(age, 3),
        "requests_running": client.running,
        "requests_waiting": client.waiting,
        "early_exit": {
            "enabled": raw.app.state.serving.control.enabled,
            "reason": raw.app.state.serving.control.reason,
        },
    }
    if age > ENGINE_STALL_S:
        message = f"the engine has not finished a step for {age:.0f} s (stalled)"
        return error_response(APIError(503, message, code="engine_stalled"))
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
async def metrics(raw: Request) -> Response:
    state = serving.get_state(raw)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/early-exit/stats", responses={503: {"model": ErrorResponse}})
async def early_exit_stats(raw: Request) -> JSONResponse:
    state = serving.get_state(raw)
    body = state.totals.as_dict()
    body["model"] = state.engine.model_id
    body["requests_waiting"] = state.client.waiting
    body["requests_running"] = state.client.running
    return JSONResponse(body)
