"""Mixture-of-experts families: routing follows ``transformers`` token by token, the test
checkpoints really route, each expert runs on its own tokens only, fused expert tensors
load, and configurations we cannot compute are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import build_checkpoint, load_reference
from models.helpers import ids_of, loaded
from patchserve.models import HookContext, load_model
from patchserve.models.config import CheckpointError
from patchserve.models.moe import MoE

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def _transformers_routes(ref, ids) -> dict[int, torch.Tensor]:
    """``transformers``' chosen experts ``[tokens, k]`` (sorted) of each routed layer."""
    routes: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(ref.model.layers):
        if hasattr(layer.mlp, "experts"):

            def record(_m, _inp, out, i=i):
                routes[i] = out[2].sort(-1).values

            handles.append(layer.mlp.gate.register_forward_hook(record))
    with torch.inference_mode():
        ref(ids)
    for h in handles:
        h.remove()
    return routes


@pytest.mark.parametrize("family", MOE)
def test_routing_equals_transformers_and_is_real(family, checkpoint_root):
    folder = build_checkpoint(family, checkpoint_root)
    model, ids = loaded(folder).model, ids_of(folder)
    expected = _transformers_routes(load_reference(folder), ids)
    assert tuple(sorted(expected)) == model.cfg.moe_layers  # the same layers are routed
    n = model.cfg.num_layers
    ctx = HookContext.build(capture=[(i, "mlp_in") for i in range(n)])
    with torch.inference_mode():
        model(ids, ctx)
    for layer, routes in expected.items():
        moe = model.blocks[layer].mlp
        assert isinstance(moe, MoE)
        _, chosen = moe.route(ctx.captured[layer, "mlp_in"][0])
        assert torch.equal(chosen.sort(-1).values, routes), layer
        # real routing: tokens choose different expert sets
        assert len({tuple(r) for r in routes.tolist()}) >= 3, layer
    used = {e for routes in expected.values() for e in routes.flatten().tolist()}
    assert used == set(range(model.cfg.num_experts))  # every expert serves some token


def test_the_checkpoints_cover_both_normalisations_and_dense_layers(checkpoint_root):
    cfgs = {f: loaded(build_checkpoint(f, checkpoint_root)).model.cfg for f in MOE}
    assert {c.norm_topk_prob for c in cfgs.values()} == {True, False}
    assert any(c.moe_layers != tuple(range(c.num_layers)) for c in cfgs.values())
    assert cfgs["qwen2_moe"].shared_expert_size > 0


@pytest.mark.parametrize("family", MOE)
def test_each_expert_runs_on_its_tokens_only(family, checkpoint_root):
    model = loaded(build_checkpoint(family, checkpoint_root)).model
    moe = model.blocks[model.cfg.moe_layers[0]].mlp
    assert isinstance(moe, MoE)
    rows: list[int] = []
    handles = [
        e.gate_proj.register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].shape[0]))
        for e in moe.experts
    ]
    x = torch.randn(37, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            full = moe(x)
    finally:
        for h in handles:
            h.remove()
    assert sum(rows) == 37 * model.cfg.experts_per_token  # k of the experts per token
    with torch.inference_mode():
        alone = [moe(x[i : i + 1]) for i in range(5)]
    for i, row in enumerate(alone):  # a token's output does not depend on the others
        assert torch.equal(row, full[i : i + 1])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_tensors_load(family, checkpoint_root, tmp_path):
    """``transformers`` 5.x's in-memory layout (``experts.gate_up_proj`` / ``down_proj``)
    saved as is loads to the same model as the per-expert checkpoint."""
    folder = build_checkpoint(family, checkpoint_root)
    fused = tmp_path / family
    shutil.copytree(folder, fused)
    (fused / "model.safetensors").unlink()
    state = load_reference(folder).state_dict()
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    save_file({k: v.contiguous() for k, v in state.items()}, fused / "model.safetensors")
    ids, model = ids_of(folder), load_model(fused).model
    with torch.inference_mode():
        expected, got = loaded(folder).model(ids), model(ids)
    assert torch.equal(got, expected)


def _edited(folder: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, **changes}))
    return out


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ("qwen2_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ("qwen3_moe", {"num_experts": 8}, "num_local_experts and num_experts differ"),
        ("qwen2_moe", {"layer_types": ["sliding_attention"] * 3}, "sliding"),
    ],
)
def test_configs_we_cannot_compute_are_refused(family, changes, message, checkpoint_root, tmp_path):
    folder = _edited(build_checkpoint(family, checkpoint_root), tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


@pytest.mark.parametrize(
    ("family", "changes", "windows"),
    [
        # no layer_types: transformers 5.x derives them (even layers below max_window_layers)
        (
            "qwen2_moe",
            {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
            (4, None, None),
        ),
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}, (4,) * 4),
        ("mixtral", {"sliding_window": 4}, (4,) * 3),
    ],
)
def test_sliding_windows_as_transformers_applies_them(
    family, changes, windows, checkpoint_root, tmp_path
):
    folder = _edited(build_checkpoint(family, checkpoint_root), tmp_path, **changes)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(raw))
    model = load_model(folder).model
    assert model.cfg.sliding_windows == windows
    ids = ids_of(folder)
    with torch.inference_mode():
        expected = load_reference(folder)(ids).logits
        got = model(ids)
    assert (got - expected).abs().max().item() < 1e-4
    with torch.inference_mode():
        unwindowed = loaded(build_checkpoint(family, checkpoint_root)).model(ids)
    assert (got - unwindowed).abs().max().item() > 1e-3  # the window changes the logits
