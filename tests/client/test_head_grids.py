"""A (layer, head) grid in the client: cells, lookups, pandas and the figure."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest

from patchserve.assets import default_model_path
from patchserve.client import SweepResult
from patchserve.engine.service import Study, StudyResources
from patchserve.models import load_model
from patchserve.text.tokenizer import Tokenizer
from patchserve.wire.requests import PatchSweepRequest

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def head_result() -> SweepResult:
    loaded = load_model(default_model_path())
    res = StudyResources(loaded.model, Tokenizer.from_folder(loaded.path), "demo_facts")
    examples = json.loads((default_model_path() / "examples.json").read_text())
    e = next(x for x in examples if x["relation"] == "ioi")
    req = PatchSweepRequest(
        prompt=e["corrupt"],
        clean_prompt=e["clean"],
        answer_token=e["answer"],
        foil_token=e["foil"],
        metric="logit_diff",
        hook="attn_head",
        heads=[1, 2, 3],
        per_position=False,
    )
    return SweepResult.from_body(Study(res, req).run())


def test_cells_lookups_and_pandas_follow_the_layer_head_grid(head_result):
    r = head_result
    assert r.by_head and r.heads == [1, 2, 3]
    values = r.to_numpy()
    assert values.shape == (len(r.layers), 3)
    best = r.top(1)[0]
    assert set(best) == {"layer", "head", "value"}
    assert best["value"] == values.max() == r.argmax["value"]
    assert (best["layer"], best["head"]) == (r.argmax["layer"], r.argmax["head"])
    assert r.value(best["layer"], None, best["head"]) == best["value"]
    with pytest.raises(ValueError, match="not per position"):
        r.value(best["layer"], 0, best["head"])
    frame = r.to_pandas()
    assert list(frame.columns) == [1, 2, 3] and frame.columns.name == "head"
    np.testing.assert_array_equal(frame.to_numpy(), values)


def test_heatmap_has_one_column_per_head(head_result):
    ax = head_result.heatmap()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["h1", "h2", "h3"]
    assert "head (patched at all" in ax.get_xlabel()
