"""Batched completions, n > 1, best_of and streaming over a real server, driven by the real
``openai`` client; every expectation comes from separate one-prompt, unstreamed requests."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from models.helpers import loaded

openai = pytest.importorskip("openai")

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital",
    "One two three four five six seven eight",
]
STEER = [{"layer": 1, "hook": "post_block", "source_inline": 0, "scale": 4.0}]
PATCH = [{"layer": 0, "hook": "mlp_out", "dest_position": 12, "source_inline": 0}]


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _packed(server) -> dict:
    """``patch_vectors`` holding one vector of the model's width."""
    width = loaded(server.folder).model.cfg.hidden_size
    row = np.linspace(-1, 1, width, dtype=np.float32)
    return {
        "dtype": "float32",
        "shape": [1, width],
        "data": base64.b64encode(row.tobytes()).decode(),
    }


def test_batched_prompts_equal_one_prompt_requests(client, server):
    extra = {"steer": STEER, "patch_vectors": _packed(server), "max_tokens": 6, "temperature": 0}
    both = client.post("/v1/completions", json={"prompt": PROMPTS, **extra}).json()
    for i, prompt in enumerate(PROMPTS):
        alone = client.post("/v1/completions", json={"prompt": prompt, **extra}).json()
        assert both["choices"][i]["token_ids"] == alone["choices"][0]["token_ids"]
        assert both["choices"][i]["text"] == alone["choices"][0]["text"]


@pytest.mark.parametrize("interventions", [{"steer": STEER}, {"patch": PATCH}])
def test_openai_client_streams_a_completion(oai, client, server, interventions):
    extra = {**interventions, "patch_vectors": _packed(server)}
    args = {"max_tokens": 8, "temperature": 0.7, "seed": 3, "stop": ["xy"]}
    body = client.post("/v1/completions", json={"prompt": PROMPTS, **extra, **args}).json()
    stream = oai.completions.create(
        model="qwen3",
        prompt=PROMPTS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
        **args,
    )
    texts = ["" for _ in PROMPTS]
    finish: list[str | None] = [None for _ in PROMPTS]
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert texts == [c["text"] for c in body["choices"]]
    assert finish == [c["finish_reason"] for c in body["choices"]]
    assert usage is not None and usage.total_tokens == body["usage"]["total_tokens"]


def test_openai_client_streams_a_chat_completion(oai, client, server):
    messages = [{"role": "user", "content": "Say something"}]
    extra = {"steer": STEER, "patch_vectors": _packed(server)}
    body = client.post(
        "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 7, "temperature": 0, **extra},
    ).json()
    stream = oai.chat.completions.create(
        model="qwen3", messages=messages, max_tokens=7, temperature=0, stream=True, extra_body=extra
    )
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == body["choices"][0]["message"]["content"]


def test_n_samples_with_a_seed_are_reproducible(oai, client):
    out = oai.completions.create(
        model="qwen3", prompt=PROMPTS[:2], max_tokens=6, temperature=1.0, seed=9, n=3
    )
    again = oai.completions.create(
        model="qwen3", prompt=PROMPTS[:2], max_tokens=6, temperature=1.0, seed=9, n=3
    )
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    assert [c.index for c in out.choices] == list(range(6))
    for p, prompt in enumerate(PROMPTS[:2]):
        for j in range(3):  # sample j draws with seed + j
            alone = client.post(
                "/v1/completions",
                json={"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 9 + j},
            ).json()
            assert out.choices[3 * p + j].text == alone["choices"][0]["text"]


def test_best_of_returns_the_likeliest_n(client):
    body = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 1.0, "seed": 4}
    samples = client.post("/v1/completions", json={**body, "n": 4, "logprobs": 0}).json()
    best = client.post("/v1/completions", json={**body, "n": 2, "best_of": 4}).json()

    def mean(choice: dict) -> float:
        lps = choice["logprobs"]["token_logprobs"]
        return sum(lps) / max(1, len(lps))

    ranked = sorted(samples["choices"], key=mean, reverse=True)[:2]
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"n": 0}, "n"),
        ({"stream": True, "logprobs": 1}, "logprobs"),
        ({"stream": True, "n": 1, "best_of": 2}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_what_cannot_be_done_is_refused(client, extra, param):
    answer = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


def test_chat_n_samples_are_the_seeded_single_samples(oai, client):
    messages = [{"role": "user", "content": "Hello"}]
    out = oai.chat.completions.create(
        model="qwen3", messages=messages, max_tokens=5, temperature=1.0, seed=21, n=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    for j, choice in enumerate(out.choices):
        alone = client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 5, "temperature": 1.0, "seed": 21 + j},
        ).json()
        assert choice.message.content == alone["choices"][0]["message"]["content"]
