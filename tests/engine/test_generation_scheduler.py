"""Continuous batching across requests: rows of concurrent requests decode together, join
between steps and leave when done; every row's result equals its prompt generated alone
(``generate``: its own loop on its own growing cache, the independent reference)."""

from __future__ import annotations

import threading

import pytest
import torch
from test_generate_batch import TEXTS, _same

from checkpoints import build_checkpoint
from models.helpers import loaded, tokenizer
from patchserve.cancel import cancel_scope
from patchserve.engine.generation import (
    GenerationRequest,
    GenerationScheduler,
    SteerVector,
    generate,
)
from patchserve.engine.generation.planner import (
    Waiting,
    admit,
    compact_moves,
    group,
    plan_prefill,
)
from patchserve.errors import Cancelled
from patchserve.models import make_edit


@pytest.fixture(scope="module")
def llama(checkpoint_root):
    folder = build_checkpoint("llama", checkpoint_root)
    return loaded(folder).model, tokenizer(folder)


def _two_requests(model, tok, **common) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
    """Request A (two prompts, steered at layer 1, a patch) and request B (two prompts, a
    different vector at layer 0, a patch at a generated position): every row different."""
    d = model.cfg.hidden_size
    gen = torch.Generator().manual_seed(5)
    va, vb, src = torch.randn(d, generator=gen), torch.randn(d, generator=gen), torch.randn(1, d)
    ids = [tok.encode(t).ids for t in TEXTS]
    a = [
        GenerationRequest(
            ids[i],
            max_tokens=9,
            steer=[SteerVector(1, "post_block", va, 3.0)],
            edits=[make_edit(0, "post_attn", [0], [1], src, alpha=0.5)],
            **common,
        )
        for i in (0, 1)
    ]
    b = [
        GenerationRequest(
            ids[i],
            max_tokens=14,  # longer than A's rows: the block grows its slots when B joins
            steer=[SteerVector(0, "pre_attn", vb, -5.0)],
            edits=[make_edit(1, "mlp_out", [0], [len(ids[i]) + 1], src * 2)],
            **common,
        )
        for i in (2, 0)
    ]
    return a, b


def _alone(model, tok, requests, n=1):
    out = []
    for r in requests:
        for j in range(n):
            seed = None if r.seed is None else r.seed + j
            out.append(generate(model, tok, GenerationRequest(**{**r.__dict__, "seed": seed})))
    return out


@pytest.mark.parametrize(
    "common",
    [
        {"temperature": 0.0, "logprobs": 2, "logprob_token_ids": [3, 7]},
        {"temperature": 0.9, "top_p": 0.95, "seed": 21, "logprobs": 1},
    ],
)
def test_a_request_joining_mid_decode_equals_each_alone(llama, common):
    model, tok = llama
    a, b = _two_requests(model, tok, **common)
    sched = GenerationScheduler(model, tok, threaded=False)
    first = sched.submit(a)
    with torch.inference_mode():
        for _ in range(3):  # A decodes alone for a while
            sched.step()
        assert sched.running == 2 and sched.steps == 3
        second = sched.submit(b, n=2)  # B (two samples a prompt) joins A's running batch
        sched.step()
        assert sched.running == 2 + 4  # decoded together
        while sched.step():
            pass
    assert sched.running == 0 and sched.block.kv.keys[0] is None  # freed when idle
    for got, want in zip(first.wait(), _alone(model, tok, a), strict=True):
        _same(got, want)
    for got, want in zip(second.wait(), _alone(model, tok, b, n=2), strict=True):
        _same(got, want)


def test_concurrent_requests_from_threads_each_get_their_own_rows(llama):
    model, tok = llama
    a, b = _two_requests(model, tok, temperature=0.0, logprobs=1)
    sched = GenerationScheduler(model, tok)  # a worker thread, as in the server
    results: dict[str, list] = {}

    def client(name, requests):
        results[name] = sched.run(requests)

    threads = [threading.Thread(target=client, args=x) for x in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, requests in (("a", a), ("b", b)):
        for got, want in zip(results[name], _alone(model, tok, requests), strict=True):
            _same(got, want)


def test_a_cancelled_request_leaves_and_the_other_finishes(llama):
    model, tok = llama
    a, b = _two_requests(model, tok, temperature=0.0, logprobs=1)
    for r in a:
        r.max_tokens = 40
    sched = GenerationScheduler(model, tok, threaded=False)
    left = threading.Event()
    with cancel_scope(left.is_set):
        gone = sched.submit(a)
    kept = sched.submit(b)
    with torch.inference_mode():
        sched.step()
        assert sched.running == 4
        left.set()  # A's caller goes away: its rows leave at the next step
        sched.step()
        assert sched.running == 2 and {s.ticket for s in sched.active} == {kept}
        while sched.step():
            pass
    with pytest.raises(Cancelled):
        gone.wait()
    for got, want in zip(kept.wait(), _alone(model, tok, b), strict=True):
        _same(got, want)


def test_admission_is_first_come_first_served_under_the_budget():
    q = [Waiting(0, 100), Waiting(1, 300), Waiting(2, 50), Waiting(3, 10)]
    assert [w.key for w in admit(q, 0, budget=400, max_rows=8)] == [0, 1]
    assert [w.key for w in admit(q, 0, budget=399, max_rows=8)] == [0]  # 2 never overtakes 1
    assert [w.key for w in admit([Waiting(0, 900)], 0, budget=400, max_rows=8)] == [0]  # alone
    rows = [Waiting(0, 5, rows=3), Waiting(1, 5, rows=3)]
    assert [w.key for w in admit(rows, 3, budget=400, max_rows=8)] == [0]
    assert admit(rows, 8, budget=400, max_rows=8) == []  # the batch is full
    assert [w.key for w in admit(rows, 0, budget=400, max_rows=2)] == [0]  # one always runs


def _cost(passes, pass_tokens):
    return sum(pass_tokens + len(p) * max(w.tokens for w in p) for p in passes)


def _best_cost(lengths, pass_tokens):
    """Every way to cut the sorted lengths into runs, tried (the independent check)."""
    ordered = sorted(lengths)
    best = None
    for mask in range(2 ** (len(ordered) - 1)):
        runs, run = [], [ordered[0]]
        for i, n in enumerate(ordered[1:]):
            if mask >> i & 1:
                runs.append(run)
                run = []
            run.append(n)
        runs.append(run)
        c = sum(pass_tokens + len(r) * max(r) for r in runs)
        best = c if best is None else min(best, c)
    return best


def test_prefill_passes_group_similar_lengths():
    lengths = [40, 8, 9, 39, 10, 38, 8, 41]
    q = [Waiting(i, n) for i, n in enumerate(lengths)]
    passes = group(q, pass_tokens=20)
    assert [[w.tokens for w in p] for p in passes] == [[8, 8, 9, 10], [38, 39, 40, 41]]
    assert len(group(q, pass_tokens=1000)) == 1  # a pass costs more than all the padding
    assert len(group(q, pass_tokens=0)) == len(set(lengths))  # padding costs, passes do not
    for seed in range(20):  # least padded tokens plus passes: against every cut
        gen = torch.Generator().manual_seed(seed)
        ls = torch.randint(1, 60, (int(torch.randint(1, 10, (1,), generator=gen)),), generator=gen)
        ws = [Waiting(i, int(n)) for i, n in enumerate(ls)]
        for pt in (0, 16, 64):
            got = group(ws, pt)
            assert sorted(w.key for p in got for w in p) == list(range(len(ws)))
            assert _cost(got, pt) == _best_cost([w.tokens for w in ws], pt)
    # the plan: admission, then grouping; every admitted prompt in exactly one pass
    plan = plan_prefill(q, 0, budget=100, max_rows=8, pass_tokens=20)
    assert sorted(w.key for p in plan for w in p) == [0, 1, 2, 3]


def test_rows_that_leave_are_filled_from_the_tail():
    assert compact_moves(6, [1, 4]) == [(1, 5)]
    assert compact_moves(5, [0, 1]) == [(0, 3), (1, 4)]
    assert compact_moves(3, [2]) == []
    assert compact_moves(2, [0, 1]) == []
