"""Every sweep cell equals a naive per-cell full forward (runtime and transformers)."""

from __future__ import annotations

import pytest
import torch

from checkpoints import load_reference
from engine.oracles import naive_cell, reference_grader, transformers_cell
from models.helpers import loaded, tokenizer
from patchserve.engine.metrics import Grader
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep, zeros_source
from patchserve.engine.sweep import run_sweep
from patchserve.models import HOOKS

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"
LONGER = "When Mary and Jo went to the big store, John gave a drink to"
TOL = 1e-4
MARI_AT = "When Mari and John went to the store, John gave a drink at"
#: ``recovered`` divides by the clean/corrupt gap of log p(answer): per family, a prompt pair
#: whose gap on the reference model is > 0.1 (the tiny random models barely tell Mary from
#: Mari), so the tolerance stays at most 10 x TOL.
RECOVERED_PROMPTS = {
    **dict.fromkeys(
        [
            *("gpt_neox", "gpt_neox_sequential", "gemma2", "gemma3", "gemma1", "gptj"),
            *("cohere", "phi_qk_layernorm", "stablelm", "stablelm_parallel_qk", "phi3"),
            *("granite", "gpt_neo", "bloom", "falcon", "mixtral"),
        ],
        (CLEAN, MARI_AT),
    ),
    "mistral": (CLEAN, "When Mari or John went to the park, Jim gave a drink to"),
    "gpt2": (
        "Then Mary or John went to the store, John gave a drink at",
        "When Mari or John went to the park, Jim gave a ball to",
    ),
    "phi": (CLEAN, "When Mary and John went to the store, John gave a book to"),
    "starcoder2": (CLEAN, "Then Mary or John went to the store, Jim gave a ball to"),
    "opt": (CLEAN, "When Mari and John went to the house, John gave a book at"),
    "opt_post_ln": (CLEAN, "When Mari and John went to the house, John gave a book at"),
    "falcon_mq": (CLEAN, "When Anna or John went to the park, John gave a drink to"),
    "falcon_alibi": (CLEAN, "Then Anna or John went to the store, John gave a ball to"),
}
MIN_GAP = 0.1


def _clean_run(model, tok, prompt=CLEAN):
    ids = tok.encode(prompt).ids
    n = model.cfg.num_layers
    return capture_run(model, "clean", prompt, ids, {h: list(range(n)) for h in HOOKS})


def _assert_matches_naive(model, spec, outcome, run, alpha=1.0, masks=None):
    grader = reference_grader(
        model, outcome.metric, run.token_ids, spec.corrupt_ids, spec.answer, spec.foil
    )
    assert outcome.answer == grader.answer
    from patchserve.text.alignment import align

    tol = TOL
    if outcome.metric == "recovered":
        # recovered divides logit-space differences by (m_clean - m_corrupt): a gap > 0.1
        # keeps the tolerance at most 10 x TOL.
        gap = abs(grader.clean_score - grader.corrupt_score)
        assert gap > MIN_GAP, gap
        tol = TOL / min(1.0, gap)

    alignment = align(run.token_ids, spec.corrupt_ids)
    checked = 0
    for hook in spec.hooks:
        grid = outcome.grids[hook]
        for i, layer in enumerate(spec.layers):
            for j, pos in enumerate(spec.positions):
                src_pos = alignment.source_position(pos)
                heads = spec.heads if hook == "attn_head" else [None]
                for k, head in enumerate(heads):
                    value = grid[i][j] if head is None else grid[i][j][k]
                    if src_pos is None:
                        assert value is None
                        continue
                    source = run.row(hook, layer, src_pos)
                    if head is not None:
                        source = source[head]
                    mask = None if masks is None else masks.get(hook)
                    expected = naive_cell(
                        model,
                        spec.corrupt_ids,
                        hook,
                        layer,
                        pos,
                        source,
                        grader,
                        head=head,
                        alpha=alpha,
                        mask=mask,
                    )
                    assert value == pytest.approx(expected, abs=tol), (hook, layer, pos, head)
                    checked += 1
    assert checked > 0


@pytest.mark.parametrize("metric", ["logprob", "recovered"])
def test_every_hook_matches_naive_forward(family_checkpoint, metric):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    clean, corrupt = CLEAN, CORRUPT
    if metric == "recovered":
        clean, corrupt = RECOVERED_PROMPTS.get(family_checkpoint.name, (CLEAN, CORRUPT))
    run = _clean_run(model, tok, clean)
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=corrupt,
        source=run,
        hooks=list(HOOKS),
        metric=metric,
        heads=[0, model.cfg.num_heads - 1],
        max_batch_tokens=64,
    )
    outcome = run_sweep(model, spec)
    _assert_matches_naive(model, spec, outcome, run)
    assert outcome.stats["computed"] > 0
    # The noise floor in log-prob units (recovered divides it by m_clean - m_corrupt).
    scale = abs(outcome.clean - outcome.corrupt) if metric == "recovered" else 1.0
    assert outcome.noise_floor * scale < 1e-4


def test_unequal_lengths_align_prefix_and_suffix(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    run = _clean_run(model, tok, LONGER)
    spec, _ = prepare_sweep(
        model, tok, prompt=CORRUPT, source=run, hooks=["post_block", "attn_out"]
    )
    assert len(run.token_ids) != len(spec.corrupt_ids)
    outcome = run_sweep(model, spec)
    unpaired = outcome.alignment.unpaired()
    assert unpaired, "the prompts differ in the middle"
    assert {s.position for s in outcome.skipped} == set(unpaired)
    _assert_matches_naive(model, spec, outcome, run)


def test_alpha_and_masks_match_naive_forward(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    run = _clean_run(model, tok)
    gen = torch.Generator().manual_seed(3)
    cfg = model.cfg
    masks = {
        "post_attn": (torch.rand(cfg.hidden_size, generator=gen) > 0.5).float(),
        "attn_head": torch.rand(cfg.head_dim, generator=gen),
    }
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hooks=["post_attn", "attn_head"],
        heads=[1],
        alpha=0.6,
        masks=masks,
        metric="kl",
    )
    outcome = run_sweep(model, spec)
    _assert_matches_naive(model, spec, outcome, run, alpha=0.6, masks=masks)


@pytest.mark.parametrize("hook", ["post_block", "pre_attn", "attn_out", "mlp_out"])
def test_grid_matches_transformers_module_hooks(family_checkpoint, hook):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    run = _clean_run(model, tok)
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hook=hook,
        metric="logit_diff",
        answer_token_id=5,
        foil_token_id=9,
    )
    outcome = run_sweep(model, spec)
    ref = load_reference(family_checkpoint)
    for i, layer in enumerate(spec.layers):
        for j, pos in enumerate(spec.positions):
            logits = transformers_cell(
                ref,
                family_checkpoint.name,
                spec.corrupt_ids,
                hook,
                layer,
                pos,
                run.row(hook, layer, pos),
            )
            expected = float(logits[5] - logits[9])
            assert outcome.grids[hook][i][j] == pytest.approx(expected, abs=TOL)


def test_zero_ablation_matches_naive_forward(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=zeros_source(model),
        hooks=["mlp_out", "attn_head"],
        heads="all",
        metric="kl",
    )
    outcome = run_sweep(model, spec)
    ids = torch.tensor([spec.corrupt_ids])
    with torch.inference_mode():
        ref_logits = model.prefill(ids).logits[0]
    grader = Grader("kl", outcome.answer, clean_logprobs=torch.log_softmax(ref_logits.double(), -1))
    for i, layer in enumerate(spec.layers):
        for j, pos in enumerate(spec.positions):
            zeros = torch.zeros(model.cfg.hidden_size)
            expected = naive_cell(model, spec.corrupt_ids, "mlp_out", layer, pos, zeros, grader)
            assert outcome.grids["mlp_out"][i][j] == pytest.approx(expected, abs=TOL)
            zh = torch.zeros(model.cfg.head_dim)
            for k, head in enumerate(spec.heads):
                expected = naive_cell(
                    model, spec.corrupt_ids, "attn_head", layer, pos, zh, grader, head=head
                )
                assert outcome.grids["attn_head"][i][j][k] == pytest.approx(expected, abs=TOL)
