"""ROME's causal tracing on the bundled demo model, through the client, averaged over all its
fact examples (noise on each subject): where the fact is restored, and bitwise determinism.

What the demo model shows (docs/tutorial.md prints the numbers): ROME's picture — the early
site is the subject's last token (hidden states, and the windowed MLPs' largest cells), the
late site the last token, and attention in the late layers carries the fact there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from patchserve import PatchStudy
from patchserve.assets import default_model_path

FACTS = [
    e
    for e in json.loads((default_model_path() / "examples.json").read_text())
    if e["relation"] != "ioi"
]
SUBJECT = ("first subject token", "last subject token")


@pytest.fixture(scope="module")
def demo(demo_server) -> Iterator[PatchStudy]:
    with PatchStudy(demo_server.url) as study:
        yield study


@pytest.fixture(scope="module")
def traces(demo: PatchStudy):
    kw = {"metric": "prob", "samples": 3, "seed": 0}
    states = demo.trace_facts(FACTS, hook="post_block", **kw)
    windowed = demo.trace_facts(FACTS, hooks=["mlp_out", "attn_out"], window=2, **kw)
    # ROME's average indirect effect: each value minus its own fact's corrupt baseline
    return (
        states.aggregate["post_block"].effects(),
        windowed.aggregate["mlp_out"].effects(),
        windowed.aggregate["attn_out"].effects(),
    )


def test_states_carry_the_fact_at_the_subject_early_and_at_the_last_token_late(traces):
    states, _, _ = traces
    early, late = states.layers[:2], states.layers[2:]
    first, last = states.layers[0], states.layers[-1]
    assert states.items == len(FACTS) == 24
    for layer in early:
        assert states.peak_role(layer) == "last subject token"  # ROME's early site
        assert states.value(layer, "last subject token") > 0.6
    for role in SUBJECT:
        assert states.value(first, role) > states.value(first, "last token")
        assert states.value(last, role) < 0.02  # gone by the last layer
    for layer in late:
        assert states.peak_role(layer) == "last token"  # ROME's late site
    assert states.value(last, "last token") > 0.8 * states.clean  # clean - corrupt
    assert abs(states.value(first, "further tokens")) < 0.02


def test_windowed_mlp_peaks_at_the_last_subject_token(traces):
    _, mlp, _ = traces
    assert mlp.window == 2
    grid = mlp.to_numpy()
    layer, role = divmod(int(np.nanargmax(grid)), grid.shape[1])
    assert mlp.roles[role] == "last subject token"  # ROME's MLP site: the whole grid's peak
    assert mlp.layers[layer] in mlp.layers[:2]
    for layer in mlp.layers[:3]:
        assert mlp.peak_role(layer) == "last subject token"
    assert mlp.value(mlp.layers[1], "last subject token") > 0.6
    for layer in mlp.layers:  # the last token's MLPs recall nothing
        assert abs(mlp.value(layer, "last token")) < 0.05
    assert mlp.value(mlp.layers[-1], "last subject token") < 0.05


def test_windowed_attention_carries_the_fact_to_the_last_token(traces):
    _, _, attn = traces
    assert attn.window == 2
    for layer in attn.layers[2:]:
        assert attn.peak_role(layer) == "last token"
        assert attn.value(layer, "last token") > 0.5
    for layer in attn.layers[:2]:  # early, attention joins the name's pieces at its end
        assert attn.peak_role(layer) == "last subject token"


def test_a_seed_gives_the_same_study_bit_for_bit(demo: PatchStudy):
    facts = FACTS[:3]
    runs = [
        demo.trace_facts(facts, hooks=["post_block", "attn_out"], samples=2, seed=seed, window=3)
        for seed in (11, 11, 12)
    ]
    varying = {"timing", "captured_source_run", "source_run"}  # wall time, fresh run names
    bodies = [r.body.model_dump(exclude={"items": {"__all__": varying}}) for r in runs]
    assert bodies[0] == bodies[1]
    assert bodies[0]["aggregate"] != bodies[2]["aggregate"]
    one = demo.trace_fact(facts[0]["clean"], "Rorsun", samples=2, seed=11, window=3)
    assert one.grid == runs[0].items[0]["post_block"].grid
    assert one.stderr == runs[0].items[0]["post_block"].stderr
