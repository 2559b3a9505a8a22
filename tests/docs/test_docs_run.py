"""Every Python example of the README, the tutorial and ``examples/`` runs as written on the
bundled demo model and shows the result it claims.

The blocks of one document run in order in one namespace (as a reader pastes them into a
notebook: top-level ``await`` allowed); ``http://localhost:8000`` is the demo server of the
test session. After each document the claims it makes are checked on what it computed.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

from patchserve import PatchStudy

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def run_blocks(path: Path, url: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__doc__"}
    for i, block in enumerate(python_blocks(path)):
        source = block.replace("http://localhost:8000", url)
        code = compile(source, f"{path.name}[{i}]", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if inspect.iscoroutine(result):
            asyncio.run(result)
    return namespace


def test_readme_examples_run_and_show_what_they_claim(demo_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(python_blocks(REPO / "README.md")) == 3
    ns = run_blocks(REPO / "README.md", demo_server.url)
    # Runtime: patching the clean subject back at layer 0 brings the fact back.
    assert float(ns["after"]) > float(ns["before"]) + 5
    # Engine: the subject's last token carries the fact early, the last token late
    # (rows = layers; columns: the subject's two tokens, the last token).
    grid = np.array(ns["outcome"].grids["post_block"])
    assert ns["spec"].positions == [4, 5, 6] and grid[0, 1] >= 0.8 and grid[-1, -1] >= 0.99
    # Client: the same study over HTTP, best cell fully recovered.
    result = ns["result"]
    assert result.positions == [4, 5, 6] and result.argmax["value"] >= 0.99
    np.testing.assert_allclose(result.to_numpy(), grid, atol=1e-5)
    ns["study"].close()


def test_tutorial_runs_and_shows_what_it_claims(demo_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_blocks(REPO / "docs" / "tutorial.md", demo_server.url)
    assert ns["result"].argmax["value"] >= 0.8  # recovered, the first sweep
    one_call = ns["one_call"]
    assert one_call.auto_captured and one_call.captured_source_run.startswith("study-")
    assert one_call.to_numpy()[-1, -1] == pytest.approx(one_call.clean, abs=1e-5)
    tokens, first = ns["subject_and_last"].tokens, ns["subject_and_last"].positions[0]
    assert tokens[first].strip() in ns["subject"]
    assert len(ns["done"]) == ns["streamed"].to_numpy().size
    assert ns["z"].fine.top(1)[0]["value"] >= 0.8
    assert set(ns["by_hook"]) == {"attn_out", "mlp_out"}
    assert (tmp_path / "heatmap.png").stat().st_size > 5_000
    assert (tmp_path / "attn_vs_mlp.png").stat().st_size > 5_000
    # ROME-style tracing: the subject early, the last token late; figure saved
    assert ns["traced"].noise["samples"] == 5 and ns["traced"].stderr is not None
    effect = ns["effect"]
    early, late = ["last subject token"] * 2, ["last token"] * 2
    assert [effect.peak_role(layer) for layer in effect.layers] == early + late
    assert (tmp_path / "rome_post_block.png").stat().st_size > 5_000
    triage = ns["triage"]  # attribution with the top cells verified
    boxed = triage.exact_mask()
    assert boxed.sum() == 3
    # what the tutorial says: the boxed cells are the exact sweep's values, bit for bit
    assert np.array_equal(np.asarray(triage.grid)[boxed], np.asarray(ns["result"].grid)[boxed])
    assert (tmp_path / "attribution.png").stat().st_size > 5_000
    with PatchStudy(demo_server.url) as study:
        server = study.sweep_layers_positions(
            ns["corrupt"],
            clean_prompt=ns["clean"],
            answer_token=ns["answer"],
            foil_token=ns["foil"],
            metric="logit_diff",
        )
    _assert_top_heads_are_the_naive_ones(ns)
    multi = ns["multi"]
    assert len(multi.answer_token_ids) == 2 and multi.answer_token.endswith(".")
    check = ns["check"].to_numpy()
    assert np.nanmax(np.abs(check - server.to_numpy())) < 1e-3  # the client-side cross-check
    assert ns["study"]._closed


def _assert_top_heads_are_the_naive_ones(ns: dict[str, Any]) -> None:
    """The tutorial's (layer, head) grids and top heads equal plain reference forwards'."""
    from engine.oracles import naive_head_grid
    from patchserve.assets import default_model_path
    from patchserve.models import load_model
    from patchserve.text.tokenizer import Tokenizer

    model = load_model(default_model_path()).model
    tok = Tokenizer.from_folder(default_model_path())
    grids = []
    for example, result in zip(ns["ioi"], ns["head_sweeps"], strict=True):
        ids = [tok.encode(example[k], False).ids for k in ("answer", "foil")]
        naive = naive_head_grid(
            model,
            tok.encode(example["clean"]).ids,
            tok.encode(example["corrupt"]).ids,
            ids[0][0],
            ids[1][0],
        ).numpy()
        np.testing.assert_allclose(result.to_numpy(), naive, atol=1e-4)
        top = [(c["layer"], c["head"]) for c in result.top(3)]
        assert top == sorted(np.ndindex(naive.shape), key=lambda lh: -naive[lh])[:3]
        grids.append(naive)
    mean = np.mean(grids, axis=0)
    assert ns["top_heads"] == sorted(np.ndindex(mean.shape), key=lambda lh: -mean[lh])[:3]
    assert ns["top_heads"] == [(0, 3), (2, 0), (0, 0)]  # what the tutorial says


def test_quickstart_example_on_the_bundled_model(demo_server, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "examples/quickstart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quick.png"
    assert module.main(["--url", demo_server.url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    best = re.search(
        r"top \d+ cells:\n\s+layer\s+\d+\s+position\s+\d+\s+'.*?'\s+([+-][\d.]+)", printed
    )
    assert best is not None, printed
    assert float(best[1]) >= 0.99  # the last token restores the fact in full
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5_000


@pytest.mark.parametrize("path", ["README.md", "docs/tutorial.md", "docs/api.md"])
def test_docs_name_only_files_in_the_repository(path):
    text = (REPO / path).read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith(("http://", "https://")):
            assert (REPO / path).parent.joinpath(link).exists(), link


def test_the_example_notebook_runs_headless(demo_server, monkeypatch):
    """examples/study.ipynb in a real Jupyter kernel: a progress bar while the sweep
    streams, the heatmap as an inline image, the grid as a DataFrame."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PATCHSERVE_URL", demo_server.url)
    notebook = nbformat.read(REPO / "examples" / "study.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    progress = "".join(
        out.get("text", "") for out in outputs if out.output_type == "stream"
    ) + "".join(
        str(out.get("data", {}).get("text/plain", ""))
        for out in outputs
        if out.output_type == "display_data"
    )
    assert "28/28" in progress  # tqdm.auto's bar reached every cell (4 layers x 7 positions)
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1
    tables = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("<table" in table and "Sun" in table and "ror" in table for table in tables)
    argmax = next(
        out["data"]["text/plain"]
        for out in outputs
        if out.output_type == "execute_result" and "'layer'" in out["data"]["text/plain"]
    )
    assert "'value': 1.0" in argmax or "'value': 0.99" in argmax


def test_api_reference_example_runs(demo_server):
    ns = run_blocks(REPO / "docs" / "api.md", demo_server.url)
    result = ns["result"]
    assert result.positions == [4, 5, 6] and result.argmax["value"] >= 0.99
    # what the reference says: ROME's early site, the subject's last token
    assert ns["traced"].aggregate["mlp_out"].effects().peak_role(0) == "last subject token"
    ns["study"].close()
