"""Speculative decoding through a real server (``--speculative lookup``) and the openai SDK: the
same text as without speculation (plain, streamed, concurrent), ``usage.speculative``, the
per-request ``speculative`` field, its 4xx errors, and the ``spec_decode`` counters."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess, octomil_cmd

SERVER_ARGS = ("--speculative", "lookup", "--num-speculative-tokens", "8", "--max-batch-size", "4")
REWRITE = (
    "Rewrite in the past tense: The team meets every Monday. Maria opens the meeting and reads "
    "the agenda. Then each engineer reports what they finished and what blocks them."
)
OFF = {"speculative": False}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _chat(client, content=REWRITE, extra=None, max_tokens=48):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra,
    )


def test_same_text_as_without_speculation_with_usage(client: openai.OpenAI) -> None:
    spec, plain = _chat(client), _chat(client, extra=OFF)
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
    usage = spec.usage.model_extra["speculative"]
    assert usage["drafts"] > 0 and 0 < usage["accepted_tokens"] <= usage["draft_tokens"]
    assert usage["acceptance_rate"] == round(usage["accepted_tokens"] / usage["draft_tokens"], 4)
    assert sum(usage["accepted_per_position"]) == usage["accepted_tokens"]
    assert plain.usage.model_extra["speculative"] is None
    assert spec.usage.model_extra["early_exit"]["avg_layers_used"] == 30  # verified at full depth


def test_streamed_equals_plain(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": REWRITE}],
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _chat(client, extra=OFF).choices[0].message.content
    assert chunks[-1].usage.model_extra["speculative"]["drafts"] > 0


def test_concurrent_neighbours_get_their_own_answers(client: openai.OpenAI) -> None:
    """Speculating requests share batched steps with plain ones; each keeps its answer."""
    prompts = [REWRITE, "List three colors.", "Repeat exactly: alpha beta gamma delta alpha beta"]
    alone = [_chat(client, p, OFF).choices[0].message.content for p in prompts]
    extras = [None, OFF, {"speculative": {"mode": "lookup", "num_speculative_tokens": 4}}]
    with ThreadPoolExecutor(3) as pool:
        got = list(
            pool.map(
                lambda a: _chat(client, *a).choices[0].message.content,
                zip(prompts, extras, strict=True),
            )
        )
    assert got == alone


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ({"mode": "fast"}, "speculative.mode"),
        ({"num_speculative_tokens": 0}, "speculative.num_speculative_tokens"),
        ({"k": 3}, "speculative.k"),
        ("lookup", "speculative"),
    ],
)
def test_bad_speculative_field_is_a_400(server: ServerProcess, field, param) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "speculative": field,
        },
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_counters_in_metrics(server: ServerProcess, client: openai.OpenAI) -> None:
    def counter(text: str, name: str) -> float:
        rows = [row for row in text.splitlines() if row.startswith(name + "{")]
        return sum(float(row.rsplit(" ", 1)[1]) for row in rows)

    before = httpx.get(f"{server.base_url}/metrics").text
    usage = _chat(client).usage.model_extra["speculative"]
    after = httpx.get(f"{server.base_url}/metrics").text
    for name, key in (
        ("octomil_spec_decode_num_drafts_total", "drafts"),
        ("octomil_spec_decode_num_draft_tokens_total", "draft_tokens"),
        ("octomil_spec_decode_num_accepted_tokens_total", "accepted_tokens"),
        ("octomil_spec_decode_num_accepted_tokens_per_pos_total", "accepted_tokens"),
    ):
        assert counter(after, name) - counter(before, name) == usage[key]


def test_self_mode_is_refused_with_its_measurement() -> None:
    r = subprocess.run(
        octomil_cmd("serve", "--speculative", "self"), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "error: --speculative self is not offered" in r.stderr and "24-31%" in r.stderr
