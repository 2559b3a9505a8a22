"""Phi-3 (LongRoPE, fused projections), Granite, SmolLM3 and Starcoder2: what the
``family_checkpoint`` parity tests do not cover — the LongRoPE context limit and its
refusals, and the config spellings each family module reads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_checkpoint, load_reference
from models.helpers import ids_of, loaded, tokenizer
from patchserve.engine.errors import InvalidArgument
from patchserve.engine.generation import GenerationRequest, generate
from patchserve.models import CheckpointError, load_model
from patchserve.models.families import granite, phi3, smollm3, starcoder2
from patchserve.models.reference import reference_forward

LIMIT = 64  # the phi3 test checkpoint's original_max_position_embeddings

SHAPE = {
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 4,
    "vocab_size": 11,
    "intermediate_size": 32,
}


@pytest.fixture(scope="module")
def phi3_folder(checkpoint_root: Path) -> Path:
    return build_checkpoint("phi3", checkpoint_root)


def _long_ids(folder: Path, n: int) -> torch.Tensor:
    ids = ids_of(folder)
    return ids.repeat(1, n // ids.shape[1] + 1)[:, :n]


def test_longrope_context_is_original_max_position_embeddings(phi3_folder):
    cfg = loaded(phi3_folder).model.cfg
    assert cfg.max_position_embeddings == LIMIT  # not config.json's 256
    rope = cfg.rope[0]
    assert rope is not None and rope.rotary_dim == 8
    scaling = rope.scaling_params()
    assert scaling is not None
    assert scaling["short_factor"] == (1.3, 2.0, 3.1, 5.0)
    assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))


def test_longrope_is_exact_up_to_the_limit_and_refuses_past_it(phi3_folder):
    """At ``LIMIT`` tokens transformers still uses the short factors (we match it); at
    ``LIMIT + 1`` it recomputes every position with the long ones (so earlier positions
    change too), which we refuse rather than approximate."""
    model, ref = loaded(phi3_folder).model, load_reference(phi3_folder)
    ids = _long_ids(phi3_folder, LIMIT + 1)
    with torch.inference_mode():
        expected = ref(ids[:, :LIMIT]).logits
        assert (model(ids[:, :LIMIT]) - expected).abs().max().item() < 1e-4
        switched = ref(ids).logits[:, :LIMIT]
        assert (switched - expected).abs().max().item() > 1e-2  # the long factors differ
        with pytest.raises(ValueError, match=rf"original_max_position_embeddings \({LIMIT}\)"):
            model(ids)
        prefix = model.prefill(ids[:, : LIMIT - 4])
        with pytest.raises(ValueError, match=f"position {LIMIT} is past"):
            model.extend(ids[:, LIMIT - 4 :], prefix.cache)
        with pytest.raises(ValueError, match="original_max_position_embeddings"):
            reference_forward(model, ids)


def test_generation_beyond_the_longrope_limit_is_refused(phi3_folder):
    model, tok = loaded(phi3_folder).model, tokenizer(phi3_folder)
    prompt = ids_of(phi3_folder)[0].tolist()
    with pytest.raises(InvalidArgument, match=f"context of {LIMIT} tokens") as info:
        generate(model, tok, GenerationRequest(prompt, max_tokens=LIMIT - len(prompt) + 1))
    assert info.value.param == "max_tokens"
    out = generate(model, tok, GenerationRequest(prompt, max_tokens=LIMIT - len(prompt)))
    assert len(out.token_ids) <= LIMIT - len(prompt)


def test_fused_projection_with_wrong_rows_is_a_checkpoint_error(phi3_folder, tmp_path):
    folder = tmp_path / "phi3"
    shutil.copytree(phi3_folder, folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight.*rows"):
        load_model(folder)


def test_phi3_4x_spelling_su_scaling_and_default_original_length():
    """transformers 4.x spelling (``rope_scaling`` with type ``su``, top-level
    ``partial_rotary_factor``); without a top-level original_max_position_embeddings
    Phi3Config uses 4096 whatever the rope parameters say."""
    raw = {
        **SHAPE,
        "max_position_embeddings": 131072,
        "partial_rotary_factor": 0.5,
        "rope_theta": 500.0,
        "rope_scaling": {
            "type": "su",
            "short_factor": [1.5, 2.5],
            "long_factor": [3.0, 4.0],
            "original_max_position_embeddings": 16,
        },
        "sliding_window": 7,
    }
    cfg = phi3.read_config(raw, "Phi3ForCausalLM")
    assert cfg.max_position_embeddings == 4096
    assert cfg.sliding_windows == (7,) * 4
    rope = cfg.rope[0]
    assert rope is not None and rope.theta == 500.0 and rope.rotary_dim == 4
    scaling = rope.scaling_params()
    assert scaling is not None
    assert scaling["original_max_position_embeddings"] == 4096
    factor = 131072 / 4096  # no factor given: max_position_embeddings / original
    assert scaling["attention_factor"] == pytest.approx(
        math.sqrt(1 + math.log(factor) / math.log(4096))
    )
    bad = {**raw, "rope_scaling": {**raw["rope_scaling"], "short_factor": [1.0]}}
    with pytest.raises(CheckpointError, match="short_factor must list 2 numbers"):
        phi3.read_config(bad, "Phi3ForCausalLM")


def test_phi3_without_scaling_keeps_its_context():
    cfg = phi3.read_config({**SHAPE, "max_position_embeddings": 4096}, "Phi3ForCausalLM")
    assert cfg.max_position_embeddings == 4096
    assert cfg.rope[0] is not None and cfg.rope[0].scaling is None
    assert cfg.sliding_windows == (None,) * 4


def test_granite_multipliers_of_one_are_no_ops():
    cfg = granite.read_config(SHAPE, "GraniteForCausalLM")
    assert (cfg.embed_scale, cfg.residual_multiplier, cfg.logit_scale) == (None, None, None)
    assert cfg.attn_scale == 1.0  # attention_multiplier defaults to 1, not 1/sqrt(d)
    raw = {**SHAPE, "embedding_multiplier": 12, "residual_multiplier": 0.22}
    cfg = granite.read_config({**raw, "logits_scaling": 16, "attention_multiplier": 0.0078125}, "")
    assert (cfg.embed_scale, cfg.residual_multiplier) == (12.0, 0.22)
    assert (cfg.logit_scale, cfg.attn_scale) == (1 / 16, 0.0078125)


def test_smollm3_rope_and_window_layers():
    """``no_rope_layers[i]`` is 1 for a rotary layer; without it every 4th layer is NoPE,
    and (``use_sliding_window``) those are the sliding layers when layer_types is absent."""
    raw = {**SHAPE, "num_hidden_layers": 8, "use_sliding_window": True, "sliding_window": 5}
    cfg = smollm3.read_config(raw, "SmolLM3ForCausalLM")
    assert [r is not None for r in cfg.rope] == [True, True, True, False] * 2
    assert cfg.sliding_windows == (None, None, None, 5) * 2
    assert cfg.tie_word_embeddings  # SmolLM3Config's default
    cfg = smollm3.read_config({**SHAPE, "no_rope_layers": [0, 1, 1, 1]}, "")
    assert [r is not None for r in cfg.rope] == [False, True, True, True]
    assert cfg.sliding_windows == (None,) * 4
    contradictory = {**SHAPE, "layer_types": ["sliding_attention"] * 4, "sliding_window": 5}
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        smollm3.read_config(contradictory, "SmolLM3ForCausalLM")


def test_starcoder2_default_rope_rotates_the_whole_head():
    raw = {**SHAPE, "partial_rotary_factor": 0.5, "sliding_window": 9, "use_bias": False}
    cfg = starcoder2.read_config(raw, "Starcoder2ForCausalLM")
    assert cfg.rope[0] is not None and cfg.rope[0].rotary_dim == 8
    assert cfg.sliding_windows == (9,) * 4
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)
    assert (cfg.norm_kind, cfg.gated_mlp, cfg.tie_word_embeddings) == ("layer", False, True)


def test_config_json_of_the_test_checkpoints(checkpoint_root):
    """The test checkpoints exercise what they are meant to (a wrong reading would fail)."""
    raw = json.loads((build_checkpoint("smollm3", checkpoint_root) / "config.json").read_text())
    assert raw["no_rope_layers"] == [1, 0, 1, 0]
    cfg = loaded(build_checkpoint("smollm3", checkpoint_root)).model.cfg
    assert cfg.sliding_windows == (None, 6, None, 6)
    assert [r is not None for r in cfg.rope] == [True, False, True, False]
