"""The official ``openai`` SDK against a real server: chat and completions, plain and streaming."""

from __future__ import annotations

import openai
import pytest
from conftest import MODEL, ServerProcess

SERVER_ARGS = ("--speed-quality", "balanced")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _check_early_exit(ee: dict, completion_tokens: int) -> None:
    assert ee["total_layers"] == 30
    assert 0 <= ee["early_exit_tokens"] <= completion_tokens
    assert 1 <= ee["min_layers_used"] <= ee["avg_layers_used"] <= ee["max_layers_used"] <= 30
    assert ee["exit_percentage"] == pytest.approx(
        100.0 * ee["early_exit_tokens"] / completion_tokens, abs=0.01
    )


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_models_retrieve(client: openai.OpenAI) -> None:
    """Regression: GET /v1/models/{id} was missing, so the SDK's models.retrieve got 404."""
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "octomil")
    assert card.model_extra["total_layers"] == 30
    assert card == client.models.list().data[0]
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-9")
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"


def test_chat_non_streaming_greedy(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"early_exit": False},
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ee = r.usage.model_extra["early_exit"]
    _check_early_exit(ee, r.usage.completion_tokens)
    # early_exit: false forces full depth.
    assert ee["early_exit_tokens"] == 0 and ee["min_layers_used"] == 30


def test_chat_length_finish_and_usage_exact(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to one hundred in words."}],
        max_completion_tokens=4,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    # Streaming carries the telemetry in the final chunk (headers leave before the tokens).
    ee_final = finals[0].model_extra["early_exit"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.model_extra["early_exit"] == ee_final
    _check_early_exit(ee_final, usage.completion_tokens)
    assert usage.completion_tokens <= 6
    # Same greedy answer as non-streaming.
    ref = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert text == ref.choices[0].message.content


def test_completions_non_streaming_and_streaming(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage.completion_tokens <= 5
    _check_early_exit(r.usage.model_extra["early_exit"], r.usage.completion_tokens)
    stream = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.9, top_p=0.95, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_logprobs_chat_and_completions(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob, abs=1e-4)
    c = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=1
    )
    assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
    assert all(len(t) <= 1 for t in c.choices[0].logprobs.top_logprobs)


def test_stop_sequence(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"]
    )
    assert " 7" not in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")


def test_per_request_early_exit_presets(client: openai.OpenAI) -> None:
    for override in ({"speed_quality": "fast"}, {"threshold": 0.2}, True):
        r = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=3,
            temperature=0,
            extra_body={"early_exit": override},
        )
        _check_early_exit(r.usage.model_extra["early_exit"], r.usage.completion_tokens)


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=17)
    assert br.value.param == "n"
