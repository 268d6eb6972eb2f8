"""Property-based fuzzing of every operation in the app's OpenAPI schema: no 5xx, ever.

Schemathesis generates valid (positive) and invalid (negative) requests from /openapi.json and
sends them to a real server. Generation is kept short: the server's default max_tokens is 2 and
any generated max_tokens is capped, so each request costs well under a second on this CPU.
"""

from __future__ import annotations

import pytest
import schemathesis
from conftest import MODEL, ServerProcess
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

SERVER_ARGS = ("--speed-quality", "balanced", "--default-max-tokens", "2", "--max-concurrency", "4")
MAX_EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 30}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _adjust(body: object, mode: GenerationMode) -> None:
    """Valid token budgets stay tiny; invalid ones (<= 0, huge, wrong type) go through as-is.
    Valid requests name the served model, so they reach the engine instead of a 404."""
    if not isinstance(body, dict):
        return
    if mode is GenerationMode.POSITIVE and "model" in body:
        body["model"] = MODEL
        # Long generated prompts only cost prefill time (prompt length has its own tests).
        prompt = body.get("prompt")
        if isinstance(prompt, (str, list)):
            body["prompt"] = prompt[:64]
        messages = body.get("messages")
        if isinstance(messages, list):
            body["messages"] = messages[:4]
            for m in body["messages"]:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    m["content"] = m["content"][:256]
    for name in TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8192:
            body[name] = min(value, 2)


@pytest.fixture(scope="module")
def schema(server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def _operations(schema: schemathesis.BaseSchema) -> list:
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(
    server: ServerProcess, schema: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for op in _operations(schema):
        if mode is GenerationMode.NEGATIVE and not list(op.body):
            continue  # nothing to make invalid in a GET without parameters

        @settings(
            max_examples=MAX_EXAMPLES[mode],
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case: schemathesis.Case) -> None:
            _adjust(case.body, mode)
            response = case.call(base_url=server.base_url, timeout=180)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} -> {response.status_code}: "
                    f"body={case.body!r} response={response.text[:300]}"
                )

        check()
    assert not failures, "\n".join(failures[:10])
    print(f"{mode.value}: responses by status {sorted(statuses.items())}")
    if mode is GenerationMode.POSITIVE:
        assert statuses.get(200, 0) >= 10, statuses  # generation really ran
    log = server.output()
    assert "Traceback" not in log, log[-3000:]
