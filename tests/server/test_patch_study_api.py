"""/v1/patch_study over a real server: items equal single sweeps, the aggregate is the mean
over ROME's token roles, the stream sends items as they finish, errors name the item."""

from __future__ import annotations

import math

import pytest

from server.test_sweep_api import CLEAN, CORRUPT, sse_events

SECOND = "When Anna and Tom went to the park, Tom gave a ball to"
ITEMS = [
    {"prompt": CLEAN, "corruption": {"type": "noise", "span": "Mary and", "samples": 2}},
    {
        "prompt": SECOND,
        "corruption": {"type": "noise", "span": "Anna", "samples": 2, "seed": 3},
        "answer_token_id": 7,
    },
    {"prompt": CLEAN, "corruption": {"type": "replace", "prompt": CORRUPT}},
]
STUDY = {"items": ITEMS, "hooks": ["post_block", "mlp_out"], "window": 2, "metric": "logprob"}


def _role_positions(subject: list[int], length: int) -> list[list[int]]:
    """ROME's rows, written out independently of patchserve.text.roles."""
    first, last = subject[0], subject[-1]
    return [
        [first],
        list(range(first + 1, last)),
        [last],
        [last + 1] if last + 1 < length else [],
        list(range(last + 2, length - 1)),
        [length - 1],
    ]


def _span_positions(client, prompt: str, span: str) -> list[int]:
    """The tokens whose /tokenize offsets overlap the span's first occurrence."""
    start = prompt.index(span)
    end = start + len(span)
    offsets = client.post("/tokenize", json={"prompt": prompt}).json()["offsets"]
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]


def _differing_positions(client, clean: str, corrupt: str) -> list[int]:
    """Where the two prompts' /tokenize ids differ (prompts of equal token length)."""
    a, b = (client.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in (clean, corrupt))
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def test_items_equal_single_sweeps_and_the_aggregate_is_the_role_mean(client):
    response = client.post("/v1/patch_study", json=STUDY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["items"]) == 3
    for item, got in zip(ITEMS, body["items"], strict=True):
        single = {k: v for k, v in STUDY.items() if k != "items"}
        alone = client.post("/v1/patch_sweep", json={**single, **item}).json()
        assert got["hook_grids"] == alone["hook_grids"]
    # the subjects from /tokenize offsets, not from what the study reports
    subjects = [
        _span_positions(client, CLEAN, "Mary and"),
        _span_positions(client, SECOND, "Anna"),
        _differing_positions(client, CLEAN, CORRUPT),
    ]
    assert all(subjects)
    assert body["subjects"] == subjects
    agg = body["aggregate"]
    assert agg["roles"][0] == "first subject token" and agg["roles"][-1] == "last token"
    for entry in agg["hook_grids"]:
        for r in range(6):
            values: list[list[float]] = [[] for _ in agg["layers"]]
            for item, subject in zip(body["items"], subjects, strict=True):
                grid = next(g["grid"] for g in item["hook_grids"] if g["hook"] == entry["hook"])
                for p in _role_positions(subject, len(item["positions"]))[r]:
                    for i in range(len(agg["layers"])):
                        values[i].append(grid[i][p])
            assert entry["counts"][r] == len(values[0])
            for i, row in enumerate(entry["grid"]):
                expected = math.fsum(values[i]) / len(values[i]) if values[i] else None
                assert row[r] == pytest.approx(expected, abs=1e-12)
    assert agg["corrupt"] == pytest.approx(sum(i["corrupt"] for i in body["items"]) / 3)


def test_the_stream_sends_each_item_then_the_body(client):
    plain = client.post("/v1/patch_study", json=STUDY).json()
    events = sse_events(client.post("/v1/patch_study", json={**STUDY, "stream": True}))
    assert events[0] == {"type": "start", "items": 3, "roles": plain["aggregate"]["roles"]}
    items = [e for e in events if isinstance(e, dict) and e["type"] == "item"]
    assert [e["index"] for e in items] == [0, 1, 2]
    assert [e["body"]["hook_grids"] for e in items] == [i["hook_grids"] for i in plain["items"]]
    summary = events[-2]
    assert summary["type"] == "summary" and summary["aggregate"] == plain["aggregate"]
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("items", "param", "words"),
    [
        (
            [ITEMS[0], {**ITEMS[1], "corruption": {"type": "noise", "span": "Zed"}}],
            "items.1.corruption.span",
            "not found",
        ),
        ([], "items", "at least 1"),
        (
            [{"prompt": CLEAN, "corruption": {"type": "replace", "prompt": CLEAN}}],
            "items.0.corruption",
            "same",
        ),
        ([{**ITEMS[0], "answer_token_id": 99999}], "items.0.answer_token_id", "vocabulary"),
    ],
)
def test_a_bad_item_is_a_400_that_names_it(client, items, param, words):
    response = client.post("/v1/patch_study", json={"items": items})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error
