"""Batched generation against one prompt at a time (the independent reference: ``generate``,
whose loop decodes each prompt alone on its own growing cache), and the pure planner."""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_checkpoint
from models.helpers import loaded, tokenizer
from patchserve.cancel import cancel_scope
from patchserve.engine.generation import (
    GenerationRequest,
    GenerationResult,
    SteerVector,
    generate,
    generate_batch,
)
from patchserve.engine.generation.batch import merge_edits
from patchserve.errors import Cancelled
from patchserve.models import make_edit

LOGPROB_TOL = 1e-5
TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "One two three four five six seven eight nine ten eleven twelve",
    "Hi",
]


def _requests(folder, d: int, **common) -> list[GenerationRequest]:
    tok = tokenizer(folder)
    ids = [tok.encode(t).ids for t in TEXTS]
    gen = torch.Generator().manual_seed(3)
    vec = torch.randn(d, generator=gen)
    src = torch.randn(1, d, generator=gen)
    return [
        # steered; a patch on a prompt position and one on a generated position
        GenerationRequest(
            ids[0],
            max_tokens=7,
            steer=[SteerVector(1, "post_block", vec, 2.0)],
            edits=[
                make_edit(0, "post_attn", [0], [3], src, alpha=0.7),
                make_edit(1, "mlp_out", [0], [len(ids[0]) + 2], src * 3),
            ],
            **common,
        ),
        GenerationRequest(ids[1], max_tokens=12, **common),  # no interventions
        GenerationRequest(
            ids[2], max_tokens=4, steer=[SteerVector(0, "pre_attn", vec, -4.0)], **common
        ),
        GenerationRequest(ids[3], max_tokens=9, echo=True, **{"logprobs": 3, **common}),
    ]


def _same(batched: GenerationResult, alone: GenerationResult) -> None:
    assert batched.token_ids == alone.token_ids
    assert batched.text == alone.text
    assert batched.finish_reason == alone.finish_reason
    assert batched.completion_tokens == alone.completion_tokens
    if alone.logprobs is not None:
        assert batched.logprobs is not None
        assert batched.logprobs.token_ids == alone.logprobs.token_ids
        for a, b in zip(batched.logprobs.steps, alone.logprobs.steps, strict=True):
            if b is None:
                assert a is None
                continue
            assert a is not None and a.token == b.token
            assert abs(a.logprob - b.logprob) < LOGPROB_TOL
            assert [i for i, _ in a.top] == [i for i, _ in b.top]
    if alone.requested_logprobs is not None:
        assert batched.requested_logprobs is not None
        for x, y in zip(batched.requested_logprobs, alone.requested_logprobs, strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[i] - y[i]) < LOGPROB_TOL for i in x)


def test_batched_equals_one_prompt_at_a_time(family_checkpoint):
    """Every family: mixed lengths and interventions, greedy and seeded sampling."""
    folder = family_checkpoint
    lm = loaded(folder)
    tok = tokenizer(folder)
    for common in (
        {"temperature": 0.0, "logprob_token_ids": [5, 9]},
        {"temperature": 0.9, "top_p": 0.9, "seed": 11, "logprobs": 2},
    ):
        requests = _requests(folder, lm.model.cfg.hidden_size, **common)
        batched = generate_batch(lm.model, tok, requests)
        for request, got in zip(requests, batched, strict=True):
            _same(got, generate(lm.model, tok, request))


def test_stop_strings_and_eos_end_rows_early(checkpoint_root):
    folder = build_checkpoint("llama", checkpoint_root)
    lm = loaded(folder)
    tok = tokenizer(folder)
    base = _requests(folder, lm.model.cfg.hidden_size, temperature=0.8, seed=5)
    alone = [generate(lm.model, tok, r) for r in base]
    # a stop string from the middle of row 1's text, a stop id at row 0's third token
    stop_text = alone[1].text[3:5]
    assert stop_text
    base[1].stop = [stop_text]
    base[0].stop_token_ids = [alone[0].token_ids[2]]
    batched = generate_batch(lm.model, tok, base)
    for request, got in zip(base, batched, strict=True):
        _same(got, generate(lm.model, tok, request))
    assert batched[0].finish_reason == "stop" and len(batched[0].token_ids) == 2
    assert batched[1].finish_reason == "stop"


def test_interventions_never_touch_other_rows(checkpoint_root):
    folder = build_checkpoint("llama", checkpoint_root)
    lm = loaded(folder)
    tok = tokenizer(folder)
    plain = _requests(folder, lm.model.cfg.hidden_size, temperature=0.0, logprobs=1)
    big = torch.full((lm.model.cfg.hidden_size,), 50.0)
    loud = GenerationRequest(
        plain[0].prompt_ids,
        max_tokens=6,
        temperature=0.0,
        steer=[SteerVector(1, "post_block", big, 3.0)],
        edits=[make_edit(0, "pre_attn", [0], [0], big[None])],
    )
    # the loud row between two plain ones: neither side hears it
    out = generate_batch(lm.model, tok, [plain[1], loud, plain[2]])
    _same(out[0], generate(lm.model, tok, plain[1]))
    _same(out[2], generate(lm.model, tok, plain[2]))
    assert out[1].token_ids != generate(lm.model, tok, plain[0]).token_ids[:6]


def test_n_samples_share_the_prefill_and_reproduce(checkpoint_root):
    folder = build_checkpoint("llama", checkpoint_root)
    lm = loaded(folder)
    tok = tokenizer(folder)
    requests = _requests(folder, lm.model.cfg.hidden_size, temperature=1.0, seed=7)[:2]
    out = generate_batch(lm.model, tok, requests, n=3)
    assert len(out) == 6
    for r, request in enumerate(requests):
        for j in range(3):
            alone = GenerationRequest(**{**request.__dict__, "seed": 7 + j})
            _same(out[3 * r + j], generate(lm.model, tok, alone))
    assert generate_batch(lm.model, tok, requests, n=3)[2].token_ids == out[2].token_ids


def test_max_tokens_zero_rows_beside_decoding_rows(checkpoint_root):
    folder = build_checkpoint("gpt2", checkpoint_root)
    lm = loaded(folder)
    tok = tokenizer(folder)
    requests = _requests(folder, lm.model.cfg.hidden_size, temperature=0.0, logprobs=1)
    requests[3].max_tokens = 0
    for got, request in zip(generate_batch(lm.model, tok, requests), requests, strict=True):
        _same(got, generate(lm.model, tok, request))


def test_merged_edits_keep_each_rows_order():
    src = torch.ones(1, 4)
    a0 = make_edit(0, "pre_attn", [0], [1], src, kind="add")
    a1 = make_edit(0, "pre_attn", [0], [1], src * 2, kind="add")
    b0 = make_edit(0, "pre_attn", [1], [2], src * 3, mask=torch.zeros(1, 4))
    merged = merge_edits([[a0, a1], [b0]])
    assert [(e.kind, e.rows.tolist()) for e in merged] == [
        ("add", [0]),
        ("add", [0]),
        ("patch", [1]),
    ]
    both = merge_edits([[a0], [make_edit(0, "pre_attn", [1], [5], src * 4, kind="add")]])
    assert len(both) == 1 and both[0].rows.tolist() == [0, 1]
    assert both[0].positions.tolist() == [1, 5]


def test_a_cancel_stops_the_rows_within_one_step(checkpoint_root):
    folder = build_checkpoint("llama", checkpoint_root)
    lm = loaded(folder)
    tok = tokenizer(folder)
    requests = _requests(folder, lm.model.cfg.hidden_size, temperature=1.0, seed=2)
    for r in requests:
        r.max_tokens, r.stop_token_ids = 40, ()
    heard: list[int] = []
    at_cancel: list[int] = []

    def listener(index: int, text: str, finish: str | None) -> None:
        heard.append(index)
        if not at_cancel:
            at_cancel.append(len(heard))

    with cancel_scope(lambda: bool(at_cancel)), pytest.raises(Cancelled):
        generate_batch(lm.model, tok, requests, listener=listener)
    # only the rest of the step that heard the cancel: no further pass ran
    assert len(heard) - at_cancel[0] < len(requests)
