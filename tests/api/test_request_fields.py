"""The remaining OpenAI request fields on the embedded model, through the ``openai`` SDK:
``n`` > 1 (plain and streamed), ``seed`` with ``n``, ``logit_bias``, frequency/presence
penalties, and ``stop`` arrays on both endpoints."""

from __future__ import annotations

import openai
import pytest
from conftest import MODEL, ServerProcess

from octomil.models import gguf_tokenizer, registry

SERVER_ARGS = ()
ASK = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def token_id():
    """The embedded model's vocabulary (from the GGUF's metadata; tensors are not evaluated)."""
    import mlx.core as mx

    path = registry.embedded_file(registry.resolve(None))
    _, meta = mx.load(str(path), return_metadata=True)
    return gguf_tokenizer.build_tokenizer(meta).convert_tokens_to_ids


def test_n_choices_are_seeded_and_reproducible(client) -> None:
    def ask():
        return client.chat.completions.create(
            model=MODEL, messages=ASK, n=3, seed=7, temperature=1.0, max_tokens=6
        )

    a, b = ask(), ask()
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # choice i samples with seed + i
    assert a.usage.completion_tokens == sum(
        client.chat.completions.create(
            model=MODEL, messages=ASK, seed=7 + i, temperature=1.0, max_tokens=6
        ).usage.completion_tokens
        for i in range(3)
    )


def test_n_choices_stream_with_their_index(client) -> None:
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        n=2,
        max_tokens=4,
        seed=3,
        temperature=1.0,
        stream=True,
    ):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert finishes == {0: "length", 1: "length"}
    plain = client.completions.create(
        model=MODEL, prompt="Once upon a time", n=2, max_tokens=4, seed=3, temperature=1.0
    )
    assert [c.text for c in plain.choices] == [texts[0], texts[1]]


def test_logit_bias_forces_and_bans_tokens(client, token_id) -> None:
    bang, question = token_id("!"), token_id("?")
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=3, temperature=0, logit_bias={str(bang): 100}
    )
    assert r.choices[0].message.content == "!!!"
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=3,
        logit_bias={str(bang): -100},
        extra_body={"guided_choice": ["!", "?"]},
    )
    assert r.choices[0].message.content == "?" and question > 0


def test_penalties_follow_openais_formula(client, token_id) -> None:
    """A "!" favoured by +30 is repeated; at step k the other tokens' logprobs rise by
    frequency * (k - 1) + presence (its count and presence in the output so far)."""

    def steps(**penalties):
        r = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=3,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            logit_bias={str(token_id("!")): 30},
            **penalties,
        )
        assert r.choices[0].message.content == "!!!"
        return [{t.token: t.logprob for t in c.top_logprobs} for c in r.choices[0].logprobs.content]

    plain, penalized = steps(), steps(frequency_penalty=1.0, presence_penalty=0.5)
    for k, (a, b) in enumerate(zip(plain, penalized, strict=True)):
        shift = 0.0 if k == 0 else 1.0 * k + 0.5
        others = [t for t in a if t != "!" and t in b]
        assert others
        for t in others:
            assert b[t] - b["!"] == pytest.approx(a[t] - a["!"] + shift, abs=1e-3)


def test_stop_arrays_on_both_endpoints(client) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=30, temperature=0, stop=["\n", " "]
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and not set(" \n") & set(text)
    r = client.completions.create(
        model=MODEL, prompt="The weather today is", max_tokens=30, temperature=0, stop=[".", ","]
    )
    assert r.choices[0].finish_reason == "stop" and not set(".,") & set(r.choices[0].text)
