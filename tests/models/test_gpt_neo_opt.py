"""GPT-Neo and OPT specifics beyond the per-family parity tests: OPT's rarer config
variants, GPT-Neo's attention-layer spelling, and that the tests' window really binds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers as tf

from checkpoints import COMMON, build_checkpoint, load_reference, randomise
from models.helpers import ids_of, loaded
from patchserve.engine.noise import embedding_std
from patchserve.models import CheckpointError, Transformer, load_model
from patchserve.models.families import gpt_neo
from patchserve.models.reference import reference_forward

TOL = 1e-4
OPT_SHAPE = dict(
    hidden_size=64,
    ffn_dim=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)


def _save(config: tf.PretrainedConfig, folder: Path) -> Path:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    randomise(model, 0)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "variant",
    [
        dict(layer_norm_elementwise_affine=False),
        dict(_remove_final_layer_norm=True, word_embed_proj_dim=32),
        dict(enable_bias=False, do_layer_norm_before=False, word_embed_proj_dim=48),
    ],
    ids=["no_affine", "no_final_norm", "no_bias_post_ln_projected"],
)
def test_opt_variants_match_transformers(variant, tmp_path):
    folder = _save(tf.OPTConfig(**COMMON, **OPT_SHAPE, **variant), tmp_path)
    ours = load_model(folder).model
    ids = torch.randint(3, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = load_reference(folder)(ids).logits
        got = ours(ids)
        naive, _ = reference_forward(ours, ids)
    assert (got - expected).abs().max().item() < TOL
    assert (naive - expected).abs().max().item() < TOL


def test_opt_noise_sigma_is_in_residual_units(checkpoint_root):
    """With a projected embedding, σ is that of the rows the residual receives."""
    folder = build_checkpoint("opt", checkpoint_root)
    model = loaded(folder).model
    decoder = load_reference(folder).model.decoder
    assert model.project_in is not None
    with torch.inference_mode():
        rows = decoder.project_in(decoder.embed_tokens.weight)
    assert embedding_std(model) == pytest.approx(float(rows.double().std()), rel=1e-6)


def test_gpt_neo_local_window_binds_on_the_test_prompt(checkpoint_root):
    """The same weights with every layer global give other logits: the tests see the window."""
    folder = build_checkpoint("gpt_neo", checkpoint_root)
    model = loaded(folder).model
    assert set(model.cfg.sliding_windows) == {None, 5}
    ids = ids_of(folder)
    assert ids.shape[1] > 5
    everywhere = dataclasses.replace(model.cfg, sliding_windows=(None,) * model.cfg.num_layers)
    global_only = Transformer(everywhere).eval()
    global_only.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert (model(ids) - global_only(ids)).abs().max().item() > 1e-3


def test_gpt_neo_attention_layers_spellings():
    spec = {"attention_types": [[["global", "local"], 2], [["local"], 1]]}
    assert gpt_neo.attention_layers(spec, 5) == ["global", "local", "global", "local", "local"]
    given = {"attention_layers": ["local", "global"], "attention_types": [[["global"], 2]]}
    assert gpt_neo.attention_layers(given, 2) == ["local", "global"]
    with pytest.raises(CheckpointError, match="num_layers"):
        gpt_neo.attention_layers(spec, 4)
    with pytest.raises(CheckpointError, match="sparse"):
        gpt_neo.attention_layers({"attention_types": [[["sparse"], 2]]}, 2)
