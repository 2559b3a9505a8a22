"""FLOP counts of the minimal sweep: an MLP layer costs what its token actually runs through."""

from __future__ import annotations

import json

from checkpoints import build_checkpoint
from models.helpers import loaded
from patchserve.engine.flops import mlp_flops


def _raw(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_a_dense_mlp_counts_its_three_projections(checkpoint_root):
    folder = build_checkpoint("llama", checkpoint_root)
    cfg, raw = loaded(folder).model.cfg, _raw(folder)
    h, i = raw["hidden_size"], raw["intermediate_size"]
    assert all(mlp_flops(cfg, layer) == 2 * 3 * h * i for layer in range(cfg.num_layers))


def test_a_routed_layer_counts_its_router_and_top_k_experts_only(checkpoint_root):
    folder = build_checkpoint("mixtral", checkpoint_root)
    cfg, raw = loaded(folder).model.cfg, _raw(folder)
    h, i = raw["hidden_size"], raw["intermediate_size"]
    experts, k = raw["num_local_experts"], raw["num_experts_per_tok"]
    assert k < experts
    assert mlp_flops(cfg, 0) == 2 * h * experts + k * 2 * 3 * h * i


def test_qwen2_moe_adds_its_shared_expert_and_dense_layers_cost_as_dense(checkpoint_root):
    folder = build_checkpoint("qwen2_moe", checkpoint_root)
    cfg, raw = loaded(folder).model.cfg, _raw(folder)
    h, k, experts = raw["hidden_size"], raw["num_experts_per_tok"], raw["num_experts"]
    routed = 2 * h * experts + k * 2 * 3 * h * raw["moe_intermediate_size"]
    shared = 2 * 3 * h * raw["shared_expert_intermediate_size"] + 2 * h
    dense = set(raw["mlp_only_layers"])
    assert dense, "the checkpoint has a dense layer"
    for layer in range(cfg.num_layers):
        expected = 2 * 3 * h * raw["intermediate_size"] if layer in dense else routed + shared
        assert mlp_flops(cfg, layer) == expected, layer
