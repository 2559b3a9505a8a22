"""OLMo, OLMo-2, OLMo-3 and Gemma (1): config spellings read as transformers reads them,
the values transformers would read differently (or not at all) refused, and the test
checkpoints' OLMo features really binding (parity itself: test_parity.py, every family)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from checkpoints import build_checkpoint, load_reference
from models.helpers import ids_of, loaded
from patchserve.models import CheckpointError, HookContext
from patchserve.models.config import make_rope
from patchserve.models.families import gemma, olmo

SHAPE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "vocab_size": 11,
    "intermediate_size": 16,
}


def _transformers_config(tmp_path: Path, raw: dict[str, Any]) -> tf.PretrainedConfig:
    """``raw`` as transformers reads it from a config.json."""
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tf.AutoConfig.from_pretrained(tmp_path)


def test_olmo3_legacy_rope_spelling_reads_as_transformers(tmp_path):
    raw = {
        **SHAPE,
        "architectures": ["Olmo3ForCausalLM"],
        "model_type": "olmo3",
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
    }
    ref = _transformers_config(tmp_path, raw)
    cfg = olmo.read_config(raw, "Olmo3ForCausalLM")
    expected = [make_rope(ref.rope_parameters[t], cfg.head_dim) for t in ref.layer_types]
    assert [(r.theta, r.scaling) for r in cfg.rope if r is not None] == [
        (r.theta, r.scaling) for r in expected
    ]
    assert cfg.sliding_windows == tuple(
        ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types
    )


def test_olmo3_rope_theta_of_the_legacy_spelling_is_refused(tmp_path):
    """transformers gives a 4.x rope_theta to the global layers alone."""
    raw = {**SHAPE, "architectures": ["Olmo3ForCausalLM"], "model_type": "olmo3"}
    ref = _transformers_config(tmp_path, {**raw, "rope_theta": 1234.0})
    assert ref.rope_parameters["sliding_attention"]["rope_theta"] != 1234.0
    with pytest.raises(CheckpointError, match=r"rope_theta 1234\.0: ambiguous"):
        olmo.read_config({**raw, "rope_theta": 1234.0}, "Olmo3ForCausalLM")
    with pytest.raises(CheckpointError, match="sliding_window is null"):
        olmo.read_config({**raw, "sliding_window": None}, "Olmo3ForCausalLM")


def test_clip_qkv_outside_olmo_or_not_positive_is_refused():
    with pytest.raises(CheckpointError, match=r"clip_qkv 8\.0: Olmo2ForCausalLM has no clipping"):
        olmo.read_config({**SHAPE, "clip_qkv": 8.0}, "Olmo2ForCausalLM")
    with pytest.raises(CheckpointError, match="must be positive"):
        olmo.read_config({**SHAPE, "clip_qkv": 0}, "OlmoForCausalLM")


def test_gemma1_activation_as_transformers_reads_it():
    legacy = tf.GemmaConfig(hidden_act="gelu")
    assert gemma.read_config({**SHAPE, "hidden_act": "gelu"}, "GemmaForCausalLM").activation == (
        legacy.hidden_act
    )
    raw = {**SHAPE, "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}
    assert gemma.read_config(raw, "GemmaForCausalLM").activation == "gelu_pytorch_tanh"
    with pytest.raises(CheckpointError, match="hidden_activation 'gelu_new' contradicts"):
        gemma.read_config({**raw, "hidden_activation": "gelu_new"}, "GemmaForCausalLM")
    with pytest.raises(CheckpointError, match="use_bidirectional_attention"):
        gemma.read_config({**SHAPE, "use_bidirectional_attention": True}, "GemmaForCausalLM")


def test_gemma1_is_not_read_as_gemma2():
    cfg = gemma.read_config(SHAPE, "GemmaForCausalLM")
    assert (cfg.family, cfg.post_attn_norm, cfg.post_mlp_norm, cfg.qk_norm) == (
        "gemma1",
        False,
        False,
        False,
    )
    assert cfg.sliding_windows == (None,) * 4 and cfg.attn_softcap is None


def _without(folder: Path, **changes: Any) -> torch.Tensor:
    """transformers' logits of the checkpoint at ``folder`` with config values changed."""
    ref = tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **changes)
    with torch.inference_mode():
        return ref.eval()(ids_of(folder)).logits


def test_the_olmo_checkpoints_exercise_their_features(checkpoint_root):
    """clip_qkv clips, OLMo-3's window binds: turning either off changes the logits."""
    for family, off in (("olmo", {"clip_qkv": None}), ("olmo3", {"sliding_window": 10**4})):
        folder = build_checkpoint(family, checkpoint_root)
        with torch.inference_mode():
            logits = load_reference(folder)(ids_of(folder)).logits
        assert (logits - _without(folder, **off)).abs().max() > 1e-2, family


def test_olmo2_hooks_read_the_raw_residual(checkpoint_root):
    """No pre-norms: mlp_in is post_attn itself."""
    folder = build_checkpoint("olmo2", checkpoint_root)
    model = loaded(folder).model
    ctx = HookContext.build(capture=[(0, "post_attn"), (0, "mlp_in")])
    with torch.inference_mode():
        model(ids_of(folder), ctx)
    assert torch.equal(ctx.captured[0, "mlp_in"], ctx.captured[0, "post_attn"])
