"""OpenAI-compatible generation with interventions, over a real server."""

from __future__ import annotations

import torch

from models.helpers import loaded, tokenizer
from patchserve.models import HookContext, make_edit

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _greedy_reference(model, ids: list[int], steps: int, edits=()) -> list[int]:
    """Full forwards, no cache: the oracle for cached generation with edits."""
    out = list(ids)
    for _ in range(steps):
        with torch.inference_mode():
            logits = model.prefill(torch.tensor([out]), HookContext.build(edits)).logits
        out.append(int(logits[0].argmax()))
    return out[len(ids) :]


def test_greedy_completion_with_a_patch_at_a_generated_position(client, server):
    model, tok = loaded(server.folder).model, tokenizer(server.folder)
    ids = tok.encode(PROMPT).ids
    dest = len(ids) + 1  # the second generated token's position
    body = client.post(
        "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": 4,
            "temperature": 0,
            "patch": [
                {"layer": 1, "hook": "post_block", "dest_position": dest, "source_module": "zeros"}
            ],
        },
    ).json()
    zeros = torch.zeros(model.cfg.hidden_size)
    expected = _greedy_reference(model, ids, 4, [make_edit(1, "post_block", [0], [dest], zeros)])
    assert body["choices"][0]["token_ids"] == expected
    plain = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    ).json()
    assert plain["choices"][0]["token_ids"] == _greedy_reference(model, ids, 4)
    assert body["choices"][0]["token_ids"][:2] == plain["choices"][0]["token_ids"][:2]
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 4,
        "total_tokens": len(ids) + 4,
    }
    assert body["object"] == "text_completion"


def test_steering_capture_and_exact_logprobs(client, server):
    model, tok = loaded(server.folder).model, tokenizer(server.folder)
    d = model.cfg.hidden_size
    vec = torch.linspace(-1, 1, d)
    client.post(
        "/v1/steering/modules/register",
        json={
            "name": "steer-dir",
            "overwrite": True,
            "vectors": {"mlp_out": {"1": {"vector": vec.tolist()}}},
        },
    )
    body = client.post(
        "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": 2,
            "logprob_token_ids": [5, 9],
            "steer": [{"layer": 1, "hook": "mlp_out", "source_module": "steer-dir", "scale": 3.0}],
            "capture": {
                "patch_source": {
                    "run": "gen-capture",
                    "hooks": {"post_block": [0, 2]},
                    "overwrite": True,
                }
            },
        },
    ).json()
    choice = body["choices"][0]
    ids = tok.encode(PROMPT).ids
    generated = choice["token_ids"]
    full = ids + generated
    edit = make_edit(1, "mlp_out", [0] * len(full), range(len(full)), vec, alpha=3.0, kind="add")
    with torch.inference_mode():
        logits = model(torch.tensor([full]), HookContext.build([edit]))[0]
    lp = torch.log_softmax(logits.double(), -1)
    for step, requested in enumerate(choice["logprob_token_ids"]):
        row = lp[len(ids) - 1 + step]
        assert (
            abs(requested["5"] - float(row[5])) < 1e-4
            and abs(requested["9"] - float(row[9])) < 1e-4
        )
        assert int(row.argmax()) == generated[step]
    assert len(choice["logprobs"]["top_logprobs"]) == 3
    assert choice["captured_source_run"] == "gen-capture"
    manifest = client.get("/v1/patch_source/gen-capture").json()
    assert manifest["hooks"] == {"post_block": [0, 2]} and manifest["token_ids"] == ids


def test_seeded_sampling_is_reproducible_and_prompt_lists_work(client):
    request = {"prompt": [PROMPT, "John"], "max_tokens": 5, "temperature": 1.0, "seed": 7}
    a = client.post("/v1/completions", json=request).json()
    b = client.post("/v1/completions", json=request).json()
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1]


def test_chat_completion_uses_the_template(client, server):
    tok = tokenizer(server.folder)
    messages = [{"role": "user", "content": "Mary and John"}]
    body = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "temperature": 0}
    ).json()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and body["object"] == "chat.completion"
    from patchserve.engine.generation import apply_chat_template

    assert body["usage"]["prompt_tokens"] == len(apply_chat_template(tok, messages))
    assert len(choice["token_ids"]) <= 2


def test_bad_completion_requests(client):
    cases = [
        (
            {
                "prompt": PROMPT,
                "patch": [
                    {"layer": 9, "hook": "post_block", "dest_position": 0, "source_module": "zeros"}
                ],
            },
            "patch.0",
        ),
        (
            {"prompt": PROMPT, "patch": [{"layer": 0, "hook": "post_block", "dest_position": 0}]},
            "patch.0",
        ),
        (
            {
                "prompt": PROMPT,
                "patch": [
                    {
                        "layer": 0,
                        "hook": "post_block",
                        "dest_position": 0,
                        "source_run": "missing-run",
                        "source_position": 0,
                    }
                ],
            },
            "patch.0",
        ),
        (
            {
                "prompt": PROMPT,
                "steer": [{"layer": 0, "hook": "post_block", "source_module": "nope"}],
            },
            "steer.0",
        ),
        ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
        ({"prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"prompt": PROMPT, "logprob_token_ids": [10**7]}, "logprob_token_ids"),
    ]
    # one status per case, as docs/api.md §2 names it: a bad field of the body (a missing
    # run or module it names included) is a 400; 404 is for a route's own path or `model`
    for body, param in cases:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, response.json()
