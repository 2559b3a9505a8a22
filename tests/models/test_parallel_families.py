"""GPT-J, Cohere, Phi, StableLM: the config spellings they are read from, what is refused,
and the interleaved rotary convention against rotation matrices written out."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_checkpoint
from patchserve.models import CheckpointError, load_model
from patchserve.models.config import RopeConfig
from patchserve.models.families import cohere, gptj, phi, stablelm
from patchserve.models.layers import Rotary, apply_rotary

SHAPE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 11,
    "intermediate_size": 16,
}
GPTJ = {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 11, "n_positions": 32}


def _copy(checkpoint_root: Path, tmp_path: Path, family: str, **changes) -> Path:
    dst = tmp_path / family
    shutil.copytree(build_checkpoint(family, checkpoint_root), dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_interleaved_rotary_turns_neighbouring_channel_pairs():
    """Pair ``(2i, 2i+1)`` turns by ``position * theta**(-2i/rd)``; channels past
    ``rotary_dim`` pass unchanged."""
    rope = RopeConfig(theta=100.0, rotary_dim=4, interleaved=True)
    x = torch.randn(3, 2, 6, dtype=torch.float64)  # [tokens, heads, head_dim]
    positions = torch.tensor([0, 1, 5])
    cos, sin = Rotary(rope).tables(positions, torch.float64)
    got = apply_rotary(x, cos, sin, interleaved=True)
    expected = x.clone()
    for t, pos in enumerate(positions.tolist()):
        for i in range(2):
            angle = pos * 100.0 ** (-2 * i / 4)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, :, 2 * i], x[t, :, 2 * i + 1]
            expected[t, :, 2 * i], expected[t, :, 2 * i + 1] = c * a - s * b, s * a + c * b
    assert torch.allclose(got, expected, atol=1e-6)  # float32 angles


def test_gptj_rotary_dim_must_fit_a_head():
    cfg = gptj.read_config({**GPTJ, "rotary_dim": 8}, "GPTJForCausalLM")
    assert cfg.rope[0] == RopeConfig(10000.0, 8, interleaved=True)
    assert cfg.parallel_residual and cfg.lm_head_bias and cfg.intermediate_size == 256
    for bad in (32, 7, None):  # wider than head_dim 16; odd; unset (= hidden_size)
        with pytest.raises(CheckpointError, match="rotary_dim"):
            gptj.read_config({**GPTJ, "rotary_dim": bad}, "GPTJForCausalLM")


def test_cohere_defaults_and_refusals():
    cfg = cohere.read_config(SHAPE, "CohereForCausalLM")
    assert cfg.rope[0] == RopeConfig(500000.0, 16, interleaved=True)  # CohereConfig defaults
    assert cfg.logit_scale == 0.0625 and cfg.tie_word_embeddings and not cfg.qk_norm
    with pytest.raises(CheckpointError, match="logit_scale"):
        cohere.read_config({**SHAPE, "logit_scale": None}, "CohereForCausalLM")
    with pytest.raises(CheckpointError, match="partial_rotary_factor"):
        cohere.read_config({**SHAPE, "partial_rotary_factor": 0.5}, "CohereForCausalLM")


@pytest.mark.parametrize(
    ("module", "extra", "rotary_dim"),
    [
        (phi, {}, 8),  # PhiConfig's default factor 0.5
        (phi, {"partial_rotary_factor": 0.25, "rope_theta": 1e4}, 4),  # transformers 4.x
        (phi, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, 8),
        (stablelm, {}, 4),  # StableLmConfig's default factor 0.25
        (stablelm, {"partial_rotary_factor": 0.5}, 8),
    ],
)
def test_partial_rotary_of_both_spellings(module, extra, rotary_dim):
    cfg = module.read_config({**SHAPE, **extra}, "Arch")
    assert cfg.rope[0] is not None and cfg.rope[0].rotary_dim == rotary_dim
    assert not cfg.rope[0].interleaved


def test_qk_norm_variants_as_data():
    shared = phi.read_config({**SHAPE, "qk_layernorm": True}, "PhiForCausalLM")
    per_head = stablelm.read_config({**SHAPE, "qk_layernorm": True}, "StableLmForCausalLM")
    assert (shared.qk_norm, shared.qk_norm_kind, shared.qk_norm_per_head) == (True, "layer", False)
    assert (per_head.qk_norm_kind, per_head.qk_norm_per_head) == ("layer_no_bias", True)


def test_parallel_stablelm_refuses_a_post_attention_norm(checkpoint_root, tmp_path):
    """A parallel block reads one norm: a second one in the checkpoint is an error, not
    silently dropped."""
    folder = _copy(checkpoint_root, tmp_path, "stablelm", use_parallel_residual=True)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*post_attention_layernorm"):
        load_model(folder)


def test_shared_norms_load_into_both_branches(checkpoint_root):
    for family, name in (("gptj", "transformer.h.1.ln_1.weight"), ("phi", None)):
        folder = build_checkpoint(family, checkpoint_root)
        model = load_model(folder).model
        tensors = load_file(folder / "model.safetensors")
        name = name or "model.layers.1.input_layernorm.weight"
        assert torch.equal(model.blocks[1].attn_norm.weight, tensors[name])
        assert torch.equal(model.blocks[1].mlp_norm.weight, tensors[name])


def test_per_head_norm_rows_are_heads(checkpoint_root, tmp_path):
    """Cohere's ``[heads, head_dim]`` q norm: swapping two rows swaps those heads' norms."""
    folder = _copy(checkpoint_root, tmp_path, "cohere")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_norm.weight"
    tensors[name] = tensors[name][[1, 0, 2, 3]].contiguous()
    save_file(tensors, folder / "model.safetensors")
    model = load_model(folder).model
    q_norm = model.blocks[0].attn.q_norm
    assert torch.equal(q_norm.weight[0], tensors[name][0])
    assert torch.equal(q_norm.weight[1], tensors[name][1])
