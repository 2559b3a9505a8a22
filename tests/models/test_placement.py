"""Device maps: specs parsed and validated, auto/balanced planned, weights placed by the loader."""

from __future__ import annotations

import logging

import pytest
import torch

from checkpoints import build_checkpoint
from patchserve.models import DeviceMapError, load_model
from patchserve.models.placement import parse_explicit, plan

GPU0, GPU1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


def _stages(placement):
    return [(str(s.device), s.start, s.stop) for s in placement.stages]


def test_explicit_ranges_in_any_order():
    placement = parse_explicit("cpu:2-3, cpu:0-1", 4)
    assert _stages(placement) == [("cpu", 0, 2), ("cpu", 2, 4)]
    assert placement.device_of(3) == CPU and placement.stage_of(1) == 0
    assert _stages(parse_explicit("meta:0", 1)) == [("meta", 0, 1)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cpu:0-2,cpu:2-3", "overlap"),
        ("cpu:0-1,cpu:3-3", "miss layer 2"),
        ("cpu:0-2", "layers 3-3 have no device"),
        ("cpu:0-4", "outside 0-3"),
        ("cpu:1-0", "outside 0-3"),
        ("cpu:a-b", "not a layer range"),
        ("0-3", "must be DEVICE:FIRST-LAST"),
        ("gpu:0-3", "not a torch device"),
        (f"{torch.cuda.device_count()}:0-3", "does not exist"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(DeviceMapError, match=message):
        parse_explicit(spec, 4)


def test_auto_fills_gpus_in_order_then_offloads_to_cpu(caplog):
    sizes = [30, 10, 10, 10, 10, 30]  # first and last carry embedding and head
    fits = plan("auto", sizes, lambda: [(GPU0, 50), (GPU1, 50)])
    assert _stages(fits) == [("cuda:0", 0, 3), ("cuda:1", 3, 6)]
    with caplog.at_level(logging.WARNING):
        spills = plan("auto", sizes, lambda: [(GPU0, 40), (GPU1, 25)])
    assert _stages(spills) == [("cuda:0", 0, 2), ("cuda:1", 2, 4), ("cpu", 4, 6)]
    assert "offloading to cpu" in caplog.text
    # a first layer too big for the first GPU moves on to the next
    assert _stages(plan("auto", sizes, lambda: [(GPU0, 20), (GPU1, 200)])) == [("cuda:1", 0, 6)]


def test_balanced_splits_evenly_or_packs_when_a_share_does_not_fit():
    sizes = [10] * 6
    assert _stages(plan("balanced", sizes, lambda: [(GPU0, 100), (GPU1, 100)])) == [
        ("cuda:0", 0, 3),
        ("cuda:1", 3, 6),
    ]
    assert _stages(plan("balanced", sizes, lambda: [(GPU0, 45), (GPU1, 15)])) == [
        ("cuda:0", 0, 4),
        ("cuda:1", 4, 5),
        ("cpu", 5, 6),
    ]


@pytest.mark.parametrize("spec", ["auto", "balanced"])
def test_no_gpu_means_everything_on_cpu_and_says_so(spec, caplog):
    with caplog.at_level(logging.WARNING):
        placement = plan(spec, [1, 2, 3], lambda: [])
    assert _stages(placement) == [("cpu", 0, 3)]
    assert "no GPU visible, every layer on cpu" in caplog.text


def test_loader_places_each_layer_on_its_device(checkpoint_root):
    """meta stands for a second device: every weight lands where the map says (no numbers)."""
    folder = build_checkpoint("llama_tied_bias", checkpoint_root)
    model = load_model(folder, device_map="cpu:0,meta:1-2").model
    for block in model.blocks:
        want = "cpu" if block.layer == 0 else "meta"
        assert {p.device.type for p in block.parameters()} == {want}, block.layer
    assert model.embed_tokens.weight.device.type == "cpu" == model.input_device.type
    # the tied head is a copy on the last layer's device
    assert model.lm_head.weight.device.type == "meta" == model.output_device.type
    assert model.final_norm.weight.device.type == "meta"
    assert model.device_of(1).type == "meta" and model.device_of(3).type == "meta"
    with pytest.raises(DeviceMapError, match="layers 2-2 have no device"):
        load_model(folder, device_map="cpu:0-1")
