"""Each way a checkpoint can be wrong ends in one clear CheckpointError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_checkpoint
from patchserve.models import SUPPORTED_ARCHITECTURES, CheckpointError, load_model
from patchserve.models.loading import parse_dtype


@pytest.fixture
def llama_copy(checkpoint_root: Path, tmp_path: Path) -> Path:
    src = build_checkpoint("llama", checkpoint_root)
    dst = tmp_path / "llama"
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(llama_copy)


def test_missing_weights(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(llama_copy)


def test_unknown_architecture_names_the_supported_ones(llama_copy):
    _edit_config(llama_copy, architectures=["BertForMaskedLM"])
    with pytest.raises(CheckpointError) as info:
        load_model(llama_copy)
    message = str(info.value)
    assert "BertForMaskedLM" in message
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in message


def test_mismatched_shapes(llama_copy):
    _edit_config(llama_copy, intermediate_size=96)
    with pytest.raises(
        CheckpointError, match=r"has shape \(64, 128\), expected \(64, 96\) from config.json"
    ):
        load_model(llama_copy)


def test_missing_tensor(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors: blocks\.1\.mlp\.up_proj\.weight"):
        load_model(llama_copy)


def test_unexpected_tensor(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(tensors, llama_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(llama_copy)


def test_corrupt_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(llama_copy)


def test_sharded_checkpoint_loads_through_its_index(llama_copy):
    tensors = load_file(llama_copy / "model.safetensors")
    (llama_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, llama_copy / file)
        weight_map.update(dict.fromkeys(keys, file))
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_model(llama_copy).model
    assert torch.equal(
        model.blocks[2].mlp.down_proj.weight, tensors["model.layers.2.mlp.down_proj.weight"]
    )
    (llama_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards listed in the index are missing"):
        load_model(llama_copy)


def test_unsupported_rope_type(llama_copy):
    _edit_config(llama_copy, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2})
    with pytest.raises(CheckpointError, match="unsupported rope_type 'yarn'"):
        load_model(llama_copy)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8")


def test_tied_embeddings_share_one_tensor(checkpoint_root):
    model = load_model(build_checkpoint("llama_tied_bias", checkpoint_root)).model
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_cli_info_prints_the_config(checkpoint_root, capsys):
    from patchserve.cli.main import main

    assert main(["info", "--model", str(build_checkpoint("qwen3", checkpoint_root))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["architecture"] == "Qwen3ForCausalLM"
    assert out["config"]["qk_norm"] is True


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"model_type": "mistral"}, (7, 7, 7, 7)),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 2},
            (None, None, 7, 7),
        ),
        ({"model_type": "qwen2", "use_sliding_window": False}, (None,) * 4),
        ({"model_type": "llama"}, (None,) * 4),
        (
            {"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"] * 2},
            (None, 7) * 2,
        ),
    ],
)
def test_sliding_windows_of_the_llama_family_spellings(flags, expected):
    """transformers 4.x flags (Mistral: every layer; Qwen: from max_window_layers on) and
    5.x ``layer_types`` read into the same per-layer windows."""
    from patchserve.models.families.llama import read_config

    raw = {
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 4,
        "vocab_size": 11,
        "intermediate_size": 16,
        "sliding_window": 7,
        **flags,
    }
    assert read_config(raw, "LlamaForCausalLM").sliding_windows == expected


def test_a_model_loaded_under_inference_mode_runs(checkpoint_root):
    """Weights made inside ``torch.inference_mode()`` have no version counter; the packed
    unembedding must not need one."""
    folder = build_checkpoint("llama", checkpoint_root)
    with torch.inference_mode():
        model = load_model(folder).model
        logits = model(torch.tensor([[3, 4, 5]]))
    assert logits.shape == (1, 3, model.cfg.vocab_size)
