"""Bloom and Falcon beyond the per-family parity suite: ALiBi's slopes and its bias at
positions where Falcon's bfloat16 rounding bites, and the configurations we refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from checkpoints import COMMON, build_checkpoint, load_reference, randomise
from models.helpers import loaded
from patchserve.models import CheckpointError, load_model
from patchserve.models.families.bloom import alibi_slopes
from patchserve.models.hooks import HookContext
from patchserve.models.layout import ResumeRows

TOL = 1e-4


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 71])
def test_slopes_are_transformers_slopes(heads):
    expected = _get_alibi_slopes(heads, torch.device("cpu"))
    assert torch.equal(torch.tensor(alibi_slopes(heads), dtype=torch.float32), expected)


@pytest.mark.parametrize("family", ["bloom", "falcon_alibi"])
def test_long_prompt_matches_transformers(checkpoint_root, family):
    """300 tokens: past 256, Falcon's bfloat16 product rounds the positions themselves."""
    folder = build_checkpoint(family, checkpoint_root)
    ids = torch.randint(3, 300, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = load_reference(folder)
    model = loaded(folder).model
    with torch.inference_mode():
        expected = ref(ids).logits
        got = model(ids)
        prefix = model.prefill(ids[:, :270])  # the cached prefix's keys carry their positions
        suffix = model.extend(ids[:, 270:], prefix.cache)
    assert (got - expected).abs().max().item() < TOL
    assert (model.unembed(suffix.hidden) - expected[:, 270:]).abs().max().item() < TOL


def _copy_with(root: Path, tmp_path: Path, family: str, **changes) -> Path:
    folder = tmp_path / family
    shutil.copytree(build_checkpoint(family, root), folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


@pytest.mark.parametrize(
    ("family", "changes", "match"),
    [
        ("bloom", {"apply_residual_connection_post_layernorm": True}, "post_layernorm"),
        ("bloom", {"pretraining_tp": 2, "slow_but_exact": True}, "slow_but_exact"),
        ("falcon", {"parallel_attn": False}, "parallel_attn=false"),
        ("falcon_mq", {"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
        ("falcon_alibi", {"num_kv_heads": 4}, "num_kv_heads 4"),
    ],
)
def test_refused_configurations_name_the_value(checkpoint_root, tmp_path, family, changes, match):
    folder = _copy_with(checkpoint_root, tmp_path, family, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_model(folder)


def test_shared_falcon_norm_is_both_norms(checkpoint_root):
    """A parallel Falcon block's one input_layernorm is our attn_norm and mlp_norm."""
    model = loaded(build_checkpoint("falcon_mq", checkpoint_root)).model
    ref = load_reference(build_checkpoint("falcon_mq", checkpoint_root))
    for block, theirs in zip(model.blocks, ref.transformer.h, strict=True):
        for ours in (block.attn_norm, block.mlp_norm):
            assert torch.equal(ours.weight, theirs.input_layernorm.weight)
            assert torch.equal(ours.bias, theirs.input_layernorm.bias)


@pytest.mark.parametrize("family", ["bloom", "falcon_alibi"])
@pytest.mark.parametrize("invariant", [False, True], ids=["shared-prefix", "absolute"])
def test_resumed_rows_on_a_shared_cache_match_transformers(checkpoint_root, family, invariant):
    """Packed rows resumed at block 1 from their own offsets on the prompt's batch-1 cache:
    the explicit path (a shared prefix) and the absolute layout see the same ALiBi bias."""
    folder = build_checkpoint(family, checkpoint_root)
    model = loaded(folder).model
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    offsets = torch.tensor([5, 12, 20])
    with torch.inference_mode():
        expected = load_reference(folder)(ids).logits[0, -1]
        full = model.prefill(ids, HookContext.build(capture=[(1, "pre_attn")]))
        hidden = full.captured[1, "pre_attn"][0]
        rows = ResumeRows.build(
            torch.cat([hidden[o:] for o in offsets.tolist()]), offsets, 30 - offsets
        )
        got = model.resume(rows, 1, full.cache, invariant=invariant)
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize(
    "changes",
    [
        {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
        {"multi_query": False, "parallel_attn": True, "alibi": True},
        {"multi_query": True, "parallel_attn": False, "bias": True},
    ],
    ids=["new-one-norm", "per-head-parallel-alibi", "multi-query-sequential"],
)
def test_other_falcon_layouts_match_transformers(tmp_path, changes):
    """Falcon variants the named checkpoints leave out, built here the same way."""
    config = tf.FalconConfig(
        **COMMON,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=96,
        **changes,
    )
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(config)
    randomise(ref, 0)
    ref.save_pretrained(tmp_path)
    ref = load_reference(tmp_path)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    model = load_model(tmp_path).model
    with torch.inference_mode():
        expected = ref(ids).logits
        got = model(ids)
    assert (got - expected).abs().max().item() < TOL
