"""Attribution patching: estimates against an independent autograd computation on the
readable reference model, and verified cells against the exact sweep, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.helpers import OTHER, PROMPT, loaded, tokenizer
from patchserve.engine.errors import InvalidArgument
from patchserve.engine.metrics import Grader
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.models import HOOKS, INJECTABLE_HOOKS
from patchserve.models.reference import reference_forward

SHORTER = "When Mari went to the store, John gave a drink to"


def clean_run(model, tok):
    n = model.cfg.num_layers
    layers = list(range(n))
    return capture_run(model, "clean", PROMPT, tok.encode(PROMPT).ids, dict.fromkeys(HOOKS, layers))


def grader_of(spec, run) -> Grader:
    """How the sweep grades: the clean top-1 answer, the clean distribution and baseline."""
    answer = int(run.last_logits.argmax())
    clean_logp = torch.log_softmax(run.last_logits.double(), -1)
    clean_score = float(clean_logp[answer])
    if spec.foil is not None:
        clean_score = float(run.last_logits[answer] - run.last_logits[spec.foil])
    recovered = spec.metric == "recovered"
    return Grader(
        metric=spec.metric,
        answer=answer,
        foil=spec.foil,
        clean_logprobs=clean_logp,
        clean_score=clean_score if recovered else None,
        corrupt_score=clean_score + 1 if recovered else None,  # the oracle's q0, set below
    )


def oracle_grid(model, spec, run, grader: Grader) -> dict[str, np.ndarray]:
    """``score(q0 + (patched - a) . dq/da)`` per cell, by reverse mode on the reference model
    (leaves added at every site), computed here from scratch."""
    leaves: dict = {}

    def edit(layer, hook, x):
        leaf = torch.zeros_like(x, requires_grad=True)
        leaves[layer, hook] = leaf
        return x + leaf

    ids = torch.tensor([spec.corrupt_ids])
    with torch.inference_mode(False), torch.enable_grad():
        logits, acts = reference_forward.__wrapped__(model, ids, edit)  # without inference mode
        last = logits[0, -1].double()
        logp = torch.log_softmax(last, -1)
        if grader.metric == "kl":
            p = grader.clean_logprobs
            q = (p.exp() * (p - logp)).sum()
        elif grader.foil is not None and grader.metric in ("logit_diff", "recovered"):
            q = last[grader.answer] - last[grader.foil]
        else:
            q = logp[grader.answer]
        keys = [(layer, hook) for hook in spec.hooks for layer in spec.layers]
        grads = torch.autograd.grad(q, [leaves[k] for k in keys], allow_unused=True)
    q0 = float(q.detach())
    grader.corrupt_score = q0
    assert run.token_ids != spec.corrupt_ids and len(run.token_ids) == len(spec.corrupt_ids)
    out = {}
    for hook in spec.hooks:
        rows = []
        for layer in spec.layers:
            g = grads[keys.index((layer, hook))]
            row = []
            for p in spec.positions:
                a = acts[layer, hook][0, p].detach().double()
                grad = torch.zeros_like(a) if g is None else g[0, p].double()
                src = run.row(hook, layer, p).double()
                patched = (1 - spec.alpha) * a + spec.alpha * src
                dq = ((patched - a) * grad).sum(-1)
                kw = "kl" if grader.metric == "kl" else None
                if grader.foil is not None and grader.metric in ("logit_diff", "recovered"):
                    kw = "logit_diff"
                values = np.asarray(q0 + dq.numpy(), dtype=np.float64).reshape(-1)
                graded = (
                    grader.score(None, **{kw: values}) if kw is not None else grader.score(values)
                )
                row.append(graded[0] if hook != "attn_head" else list(graded[spec.heads]))
            rows.append(row)
        out[hook] = np.asarray(rows, dtype=np.float64)
    return out


def as_array(grid) -> np.ndarray:
    return np.asarray(
        [[[np.nan if v is None else v for v in c] if isinstance(c, list) else c for c in r]
         for r in grid],
        dtype=np.float64,
    )  # fmt: skip


def check_against_oracle(model, tok, run, prompt=OTHER, **kwargs) -> None:
    spec, _ = prepare_sweep(model, tok, prompt=prompt, source=run, **kwargs)
    out = run_sweep(model, spec)
    assert out.method == spec.method == "attribution"
    expected = oracle_grid(model, spec, run, grader_of(spec, run))
    for hook in spec.hooks:
        got = as_array(out.grids[hook])
        np.testing.assert_allclose(got, expected[hook], rtol=0, atol=1e-5, err_msg=hook)
        assert np.isfinite(got).sum() > 0
        kinds = np.asarray(out.kinds[hook], dtype=object)
        assert set(kinds[np.isfinite(got)].ravel()) == {"estimate"}


def test_estimates_equal_an_independent_autograd_computation(family_checkpoint):
    model, tok = loaded(family_checkpoint).model, tokenizer(family_checkpoint)
    run = clean_run(model, tok)
    check_against_oracle(
        model, tok, run, hooks=list(INJECTABLE_HOOKS), heads="all", method="attribution"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric": "kl"},
        {"metric": "prob", "alpha": 0.5},
        {"metric": "recovered", "foil_token_id": 7},
        {"metric": "logit_diff", "foil_token_id": 7, "hooks": ["mlp_out", "attn_head"]},
    ],
)
def test_every_metric_is_estimated_like_the_oracle(checkpoint_root, kwargs):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    kwargs = {"hooks": ["post_block", "attn_out"], "heads": None, **kwargs}
    if "attn_head" in kwargs["hooks"]:
        kwargs["heads"] = "all"
    check_against_oracle(model, tok, clean_run(model, tok), method="attribution", **kwargs)


def test_verified_cells_are_the_exact_sweeps_bit_for_bit_and_the_rest_estimates(checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    run = clean_run(model, tok)
    common = {"hooks": ["post_block", "attn_head"], "heads": "all", "max_batch_tokens": 48}
    exact_spec, _ = prepare_sweep(model, tok, prompt=OTHER, source=run, **common)
    exact = run_sweep(model, exact_spec)
    est_spec, _ = prepare_sweep(
        model, tok, prompt=OTHER, source=run, method="attribution", **common
    )
    estimates = run_sweep(model, est_spec)
    spec, _ = prepare_sweep(
        model, tok, prompt=OTHER, source=run, method="attribution+verify", verify_top_k=4, **common
    )
    events = []
    out = run_sweep(model, spec, on_cell=lambda c, d, t: events.append((c.kind, c.value, d, t)))
    n = spec.num_cells
    # Estimates stream first (done 1..n of n), then the exact values as they land.
    assert [e[0] for e in events[:n]] == ["estimate"] * n
    assert [e[2] for e in events] == list(range(1, len(events) + 1))
    verified = events[n:]
    assert verified and {e[0] for e in verified} == {"exact"} and verified[-1][3] == len(events)
    assert out.stats["verified"] == len(verified) >= 4
    changes = []
    for hook in spec.hooks:
        got, kinds = as_array(out.grids[hook]), np.asarray(out.kinds[hook], dtype=object)
        want, est = as_array(exact.grids[hook]), as_array(estimates.grids[hook])
        exact_cells = kinds == "exact"
        assert np.array_equal(got[exact_cells], want[exact_cells])  # bit for bit
        np.testing.assert_array_equal(got[kinds == "estimate"], est[kinds == "estimate"])
        pairs = zip(est.ravel(), kinds.ravel(), strict=True)
        changes += [(abs(e - estimates.corrupt), k) for e, k in pairs]
    top = sorted((c for c in changes if not np.isnan(c[0])), key=lambda c: -c[0])[:4]
    assert all(kind == "exact" for _, kind in top)
    # The argmax is the merged grid's.
    for hook in spec.hooks:
        values = as_array(out.grids[hook])
        assert out.argmax[hook].value == np.nanmax(values)
    # Estimates are said to be estimates; an estimated argmax is named as one.
    for outcome in (estimates, out):
        assert any("first-order estimates" in w for w in outcome.warnings)
        for hook in spec.hooks:
            named = any(f"argmax of {hook} " in w for w in outcome.warnings)
            assert named == (outcome.argmax[hook].kind == "estimate")
    assert all(any(f"argmax of {h} " in w for w in estimates.warnings) for h in spec.hooks)
    assert not any("first-order" in w for w in exact.warnings)


def test_unaligned_cells_are_skipped_as_in_the_exact_sweep(checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    run = clean_run(model, tok)
    kwargs = {"hooks": ["post_block"], "prompt": SHORTER, "source": run}
    exact = run_sweep(model, prepare_sweep(model, tok, **kwargs)[0])
    spec, _ = prepare_sweep(model, tok, method="attribution", **kwargs)
    out = run_sweep(model, spec)
    skipped = {(c.layer, c.position) for c in exact.skipped}
    assert skipped and skipped == {(c.layer, c.position) for c in out.skipped}
    assert np.array_equal(
        np.isnan(as_array(out.grids["post_block"])), np.isnan(as_array(exact.grids["post_block"]))
    )


@pytest.mark.parametrize(
    ("method", "k", "param"),
    [
        ("fast", None, "method"),
        ("attribution", 3, "verify_top_k"),
        ("attribution+verify", 0, "verify_top_k"),
    ],
)
def test_bad_methods_are_invalid_arguments(checkpoint_root, method, k, param):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    with pytest.raises(InvalidArgument) as info:
        prepare_sweep(model, tok, prompt=OTHER, source=None, method=method, verify_top_k=k)
    assert info.value.param == param


def test_verification_computes_only_the_top_cells_bit_for_bit(checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    run = clean_run(model, tok)
    common = {"hooks": ["post_block", "mlp_out"], "prompt": OTHER, "source": run}
    exact = run_sweep(model, prepare_sweep(model, tok, **common)[0])
    spec, _ = prepare_sweep(model, tok, method="attribution+verify", verify_top_k=5, **common)
    out = run_sweep(model, spec)
    assert out.stats["verified"] == out.stats["computed"] == 5
    for hook in spec.hooks:
        kinds = np.asarray(out.kinds[hook], dtype=object) == "exact"
        got, want = as_array(out.grids[hook]), as_array(exact.grids[hook])
        assert kinds.any() and np.array_equal(got[kinds], want[kinds])
