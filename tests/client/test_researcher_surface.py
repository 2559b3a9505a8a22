"""What a researcher touches, on the bundled demo model: warnings that travel, the API traps
of the seed's client closed, kl ranked the right way, and figures whose colour scale says
the truth (asserted through matplotlib's objects)."""

from __future__ import annotations

import asyncio
import json
import sys
import warnings
from collections.abc import Iterator

import matplotlib
import numpy as np
import pytest

from patchserve import AsyncPatchStudy, PatchServeWarning, PatchStudy, Span
from patchserve.assets import default_model_path
from patchserve.client.errors import BadRequestError
from patchserve.client.figures import heatmaps

matplotlib.use("Agg")
import matplotlib.pyplot as plt

EXAMPLES = json.loads((default_model_path() / "examples.json").read_text())
FACT = EXAMPLES[0]  # "The capital of Rorsun is" -> " Pesmum"; corrupt subject "Sunror"


@pytest.fixture(scope="module")
def demo(demo_server) -> Iterator[PatchStudy]:
    with PatchStudy(demo_server.url) as study:
        yield study


def sweep(demo: PatchStudy, **kwargs):
    kwargs.setdefault("clean_prompt", FACT["clean"])
    return demo.sweep_layers_positions(FACT["corrupt"], **kwargs)


# -- warnings ---------------------------------------------------------------------------------


def test_an_answer_without_its_leading_space_is_flagged(demo):
    assert FACT["answer"] == " Pesmum"
    with pytest.warns(PatchServeWarning, match=r"'Pesmum'.*' Pesmum'.*#1.*leading space"):
        result = sweep(demo, answer_token="Pesmum", layers=[0])
    assert len(result.warnings) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchServeWarning)
        assert sweep(demo, answer_token=" Pesmum", layers=[0]).warnings == []


def test_a_warning_points_at_the_users_line(demo, demo_server):
    """The synchronous client runs its calls on a loop thread: its warnings are raised in the
    caller's thread, at the caller's line (not asyncio/events.py), as the async client's are,
    however deep in the client they were found (zoom's two sweeps)."""
    kw = {"clean_prompt": FACT["clean"], "answer_token": "Pesmum"}

    async def asynchronous() -> int:
        async with AsyncPatchStudy(demo_server.url) as study:
            line = sys._getframe().f_lineno + 1
            await study.sweep_layers_positions(FACT["corrupt"], layers=[0], **kw)
        return line

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = [sys._getframe().f_lineno + 1]
        demo.sweep_layers_positions(FACT["corrupt"], layers=[0], **kw)
        lines += [sys._getframe().f_lineno + 1] * 2  # zoom warns once per sweep
        demo.zoom(FACT["corrupt"], stride=2, **kw)
        lines.append(asyncio.run(asynchronous()))
    ours = [w for w in caught if issubclass(w.category, PatchServeWarning)]
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line) for line in lines]


def test_identical_prompts_and_repeated_spans_are_flagged(demo):
    clean = FACT["clean"]
    with pytest.warns(PatchServeWarning, match="identical"):
        demo.sweep_layers_positions(clean, clean_prompt=clean, layers=[0])
    with pytest.warns(PatchServeWarning, match=r"span 'a' occurs \d+ times"):
        sweep(demo, layers=[0], positions=[Span("a")])


def test_skipped_cells_are_listed_and_warnings_reach_the_stream(demo_server):
    with demo_server.client() as c:
        body = c.post(
            "/v1/patch_sweep",
            json={
                "prompt": "The capital of Sunror Pesmum Vegas is",
                "clean_prompt": FACT["clean"],
                "layers": [0],
                "positions": [0, 4],
            },
        ).json()
    assert {s["position"] for s in body["skipped"]} == {4}
    assert body["warnings"] == []  # a sweep with nothing alignable is a 400, not a warning
    # The summary of a stream carries the same warnings as the body.
    with demo_server.client() as c:
        body = {"prompt": FACT["clean"], "clean_prompt": FACT["clean"], "layers": [0]}
        with c.stream("POST", "/v1/patch_sweep", json={**body, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    summary = json.loads(lines[-1][6:])
    assert summary["type"] == "summary" and "identical" in summary["warnings"][0]


# -- API traps --------------------------------------------------------------------------------


def test_everything_after_the_prompt_is_keyword_only(demo):
    with pytest.raises(TypeError):
        demo.sweep_layers_positions(FACT["corrupt"], FACT["clean"])  # type: ignore[misc]
    with pytest.raises(TypeError):
        demo.ablation_sweep(FACT["corrupt"], "zeros")  # type: ignore[misc]


def test_hooks_always_returns_a_dict_and_hook_a_result(demo):
    one = sweep(demo, hooks=["mlp_out"], layers=[0])
    assert isinstance(one, dict) and list(one) == ["mlp_out"]
    single = sweep(demo, hook="mlp_out", layers=[0])
    assert not isinstance(single, dict) and single.grid == one["mlp_out"].grid


def test_transformer_lens_names(demo, demo_server):
    ours = sweep(demo, hook="post_block", layers=[1])
    for name in ("resid_post", "hook_resid_post"):
        assert sweep(demo, hook=name, layers=[1]).grid == ours.grid
    with pytest.raises(ValueError, match=r"hook 'post_block' at layer 0.*layers=\[0\]"):
        sweep(demo, hook="blocks.0.hook_resid_post")
    with demo_server.client() as c:
        body = {"prompt": FACT["corrupt"], "clean_prompt": FACT["clean"]}
        error = c.post("/v1/patch_sweep", json={**body, "hook": "blocks.2.attn.hook_z"}).json()[
            "error"
        ]
    assert error["param"] == "hook" and "'attn_head' at layer 2" in error["message"]


def test_negative_positions_count_from_the_end(demo):
    result = sweep(demo, layers=[0], positions=[-1, -2])
    n = len(result.tokens)
    assert result.positions == [n - 1, n - 2]
    with pytest.raises(BadRequestError, match="out of range"):
        sweep(demo, layers=[0], positions=[-(n + 1)])


def test_progress_bar_follows_the_stream(demo, capsys):
    sweep(demo, layers=[0, 1], progress=True)
    err = capsys.readouterr().err
    assert "sweep" in err and "14/14" in err  # 2 layers x 7 positions


# -- kl: lower is better everywhere -----------------------------------------------------------


def test_kl_best_is_the_lowest(demo):
    result = sweep(demo, metric="kl")
    values = result.to_numpy()
    lowest = float(np.nanmin(values))
    assert result.argmax is not None and result.argmax["value"] == pytest.approx(lowest)
    best = result.argmax_cell()
    assert best is not None and best["value"] == pytest.approx(lowest)
    top = [c["value"] for c in result.top(5)]
    assert top == sorted(top) and top[0] == pytest.approx(lowest)
    assert lowest < 0.5 < float(np.nanmax(values))  # restoring the subject does restore


# -- figures ----------------------------------------------------------------------------------


def test_recovered_is_drawn_on_a_fixed_scale_with_a_full_title(demo):
    result = sweep(demo, answer_token=FACT["answer"], foil_token=FACT["foil"], metric="recovered")
    ax = result.heatmap()
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax, norm.vcenter) == (-1.0, 1.0, 0.0)
    title = ax.get_title()
    for part in (
        "post_block",
        "recovered",
        "' Pesmum'",
        "' Terzir'",
        "demo_facts",
        "clean",
        "corrupt",
    ):
        assert part in title
    assert f"{result.clean:.3g}" in title and f"{result.corrupt:.3g}" in title
    starred = [t for t in ax.get_xticklabels() if t.get_text().endswith("*")]
    assert [t.get_text() for t in starred] == ["4 ' Sun' *", "5 'ror' *"]
    assert matplotlib.colors.same_color(starred[0].get_color(), "#b2182b")
    plt.close(ax.figure)
    small = result.heatmap(vmin=-0.5, vmax=2.0, center=0.25)
    norm = small.images[0].norm
    assert (norm.vmin, norm.vmax, norm.vcenter) == (-0.5, 2.0, 0.25)
    plt.close(small.figure)


def test_noise_is_pale_because_the_scale_holds_the_clean_baseline(demo):
    result = sweep(demo, answer_token=FACT["answer"], metric="logprob", layers=[0], positions=[1])
    ax = result.heatmap()
    norm = ax.images[0].norm
    assert norm.vcenter == pytest.approx(result.corrupt)
    assert norm.vmax - norm.vcenter >= abs(result.clean - result.corrupt) - 1e-9
    (value,) = result.to_numpy().ravel()
    assert abs(float(norm(value)) - 0.5) < 0.05  # a cell that changes nothing stays white
    plt.close(ax.figure)


def test_two_hooks_share_one_scale_and_one_colour_bar(demo):
    results = sweep(
        demo,
        hooks=["attn_out", "mlp_out"],
        metric="logit_diff",
        answer_token=FACT["answer"],
        foil_token=FACT["foil"],
    )
    figure = heatmaps(results)
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 2
    norms = [ax.images[0].norm for ax in panels]
    assert (norms[0].vmin, norms[0].vmax) == (norms[1].vmin, norms[1].vmax)
    everything = np.concatenate([r.to_numpy().ravel() for r in results.values()])
    assert norms[0].vmin <= np.nanmin(everything) and np.nanmax(everything) <= norms[0].vmax
    assert len(figure.axes) == 3  # two panels and one colour bar
    plt.close(figure)


def test_heads_are_labelled_and_skipped_cells_have_a_legend(demo):
    heads = sweep(demo, hook="attn_head", heads=[0, 2], layers=[0, 1], positions=[5, 6])
    ax = heads.heatmap()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["5 'ror' h0 *", "5 'ror' h2 *", "6 ' is' h0", "6 ' is' h2"]
    assert ax.images[0].get_array().shape == (2, 4)
    plt.close(ax.figure)
    longer = demo.sweep_layers_positions(
        "The capital of Sunror Vegas is", clean_prompt=FACT["clean"], layers=[0]
    )
    ax = longer.heatmap()
    legend = ax.get_legend()
    assert legend is not None and "skipped" in legend.get_texts()[0].get_text()
    plt.close(ax.figure)


def test_kl_is_drawn_from_zero_with_the_restored_end_dark(demo):
    result = sweep(demo, metric="kl", layers=[0, 1])
    ax = result.heatmap()
    norm = ax.images[0].norm
    assert norm.vmin == 0.0 and norm.vmax >= float(np.nanmax(result.to_numpy()))
    cmap = ax.images[0].get_cmap()
    assert sum(cmap(0.0)[:3]) < sum(cmap(1.0)[:3])  # 0 (fully restored) is the dark end
    plt.close(ax.figure)


def test_one_scale_for_two_studies_with_different_baselines_is_refused(demo):
    first = sweep(demo, metric="logprob", layers=[0])
    other = demo.sweep_layers_positions(
        EXAMPLES[1]["corrupt"], clean_prompt=EXAMPLES[1]["clean"], metric="logprob", layers=[0]
    )
    assert first.corrupt != other.corrupt
    with pytest.raises(ValueError, match="different corrupt baselines"):
        heatmaps([first, other])
    figure = heatmaps([first, other], center=-5.0)  # an explicit centre is the user's choice
    assert figure.axes[0].images[0].norm.vcenter == -5.0
    plt.close(figure)
