"""The dashboard (``GET /``) in a real browser: Debian's Chromium (``apt-get install chromium``,
never a downloaded browser) driven headless by Playwright's Python API against a real server
on the bundled demo model.

Nothing here is skipped: without Chromium or Playwright these tests fail. The screenshots go
to the test's temporary folder; with ``PATCHSERVE_DOCS_IMAGES=1`` the main one also replaces
``docs/images/dashboard.png`` (the picture in the README and the docs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from patchserve.client.figures import scale_bounds
from server.conftest import Server, start_server

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CLEAN, CORRUPT = "The capital of Rorsun is", "The capital of Sunror is"
ALL_HOOKS = ["pre_attn", "attn_out", "post_attn", "mlp_in", "mlp_out", "post_block"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: apt-get update && apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    """A page on the server, with every URL it requested and every script error it raised."""

    page: Page
    server: Server
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self, query: str = "") -> None:
        self.page.goto(f"{self.server.url}/{query}")
        self.page.wait_for_selector("body[data-ready=true]", timeout=30_000)

    def testid(self, name: str) -> Any:
        return self.page.get_by_test_id(name)

    def cells(self, hook: str) -> dict[tuple[int, int, int | None], float | None]:
        rows = self.page.eval_on_selector_all(
            f"[data-testid=heatmap-{hook}] rect.cell",
            "els => els.map(e => [e.dataset.layer, e.dataset.position, e.dataset.head ?? null,"
            " e.dataset.value ?? null, e.dataset.state])",
        )
        return {
            (int(layer), int(pos), None if head is None else int(head)): (
                None if value is None else float(value)
            )
            for layer, pos, head, value, state in rows
            if state != "pending"
        }

    def filled(self, hook: str) -> tuple[int, int]:
        box = self.testid(f"heatmap-{hook}")
        return int(box.get_attribute("data-filled")), int(box.get_attribute("data-total"))

    def wait_done(self, timeout: float = 60_000) -> None:
        self.page.wait_for_selector(
            "[data-testid=summary][data-state=done]", timeout=timeout, state="attached"
        )

    def foreign_requests(self) -> list[str]:
        origin = urlsplit(self.server.url)
        own = (origin.scheme, origin.netloc)
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme == "data":
                continue
            if parts.scheme == "blob":  # blob:http://host:port/uuid, made by the page itself
                parts = urlsplit(parts.path)
            if (parts.scheme, parts.netloc) != own:
                out.append(url)
        return out


@contextmanager
def new_tab(browser: Browser, server: Server) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1600, "height": 860}, accept_downloads=True)
    page = context.new_page()
    tab = Tab(page, server)
    page.on("request", lambda request: tab.requests.append(request.url))
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    # A 4xx answer is logged by the browser as a failed resource; it is shown by the page.
    page.on(
        "console",
        lambda msg: (
            msg.type == "error"
            and not msg.text.startswith("Failed to load resource")
            and tab.errors.append(msg.text)
        ),
    )
    yield tab
    context.close()


@pytest.fixture
def tab(browser: Browser, demo_server: Server) -> Iterator[Tab]:
    with new_tab(browser, demo_server) as tab:
        yield tab


def api_grids(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    with server.client() as client:
        response = client.post("/v1/patch_sweep", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def grid_cells(answer: dict[str, Any], hook: str) -> dict[tuple[int, int, int | None], Any]:
    (grid,) = [g["grid"] for g in answer["hook_grids"] if g["hook"] == hook]
    out: dict[tuple[int, int, int | None], Any] = {}
    for i, layer in enumerate(answer["layers"]):
        for j, position in enumerate(answer["positions"]):
            if isinstance(grid[i][j], list):
                for k, head in enumerate(answer["heads"]):
                    out[layer, position, head] = grid[i][j][k]
            else:
                out[layer, position, None] = grid[i][j]
    return out


def assert_same(page_cells: dict, api_cells: dict) -> None:
    assert page_cells.keys() == api_cells.keys()
    for key, value in api_cells.items():
        if value is None:
            assert page_cells[key] is None, key
        else:
            assert page_cells[key] == pytest.approx(value, abs=1e-9), key


def test_a_sweep_from_the_form_fills_every_heatmap_with_the_apis_values(
    tab: Tab, tmp_path: Path
) -> None:
    hooks = ["attn_out", "mlp_out", "post_block"]
    tab.open()
    page = tab.page
    # The page opens on the demo study: the form holds it, the corrupt prompt as chips.
    assert tab.testid("clean").input_value() == CLEAN
    assert tab.testid("answer").input_value() == " Pesmum"
    page.wait_for_selector("[data-testid=chip]")
    chips = page.eval_on_selector_all("[data-testid=chip]", "els => els.map(e => e.textContent)")
    assert chips == ["0<|endoftext|>", "1The", "2·capital", "3·of", "4·Sun", "5ror", "6·is"]
    assert page.eval_on_selector_all(
        ".chip.corrupted", "els => els.map(e => e.dataset.position)"
    ) == ["4", "5"]
    tab.testid("hooks").select_option(hooks)
    tab.testid("layers").fill("all")
    tab.testid("positions").fill("all")
    tab.testid("metric").select_option("recovered")
    tab.testid("run").click()
    tab.wait_done()

    body = {
        "prompt": CORRUPT, "clean_prompt": CLEAN, "answer_token": " Pesmum",
        "foil_token": " Terzir", "metric": "recovered", "hooks": hooks, "layers": "all",
        "positions": "all_prompt",
    }  # fmt: skip
    answer = api_grids(tab.server, body)
    for hook in hooks:
        assert tab.filled(hook) == (4 * 7, 4 * 7)
        assert_same(tab.cells(hook), grid_cells(answer, hook))
    post = tab.cells("post_block")
    # the demo model's fact: at the subject's last token early, at the last token late
    assert post[0, 5, None] >= 0.8 and post[3, 6, None] >= 0.99
    # Token strings on the x axis, the corrupted one starred; the fixed recovered scale.
    labels = page.eval_on_selector_all(
        "[data-testid=heatmap-post_block] text[data-token]",
        "els => els.map(e => e.firstChild.nodeValue)",
    )
    assert labels[0].startswith("<|endo") and labels[1:] == [
        "The",
        "capital",
        "of",
        "*Sun",
        "*ror",
        "is",
    ]
    legend = tab.testid("legend").inner_text()
    assert "recovered (1 = clean, 0 = corrupt)" in legend and "-1.00" in legend
    summary = tab.testid("summary").inner_text()
    assert f"{answer['clean']:.4f}" in summary and f"{answer['corrupt']:.4f}" in summary
    assert "corrupted positions [4, 5]" in summary
    assert "post_block: 1.00" in summary and 'layer 3, position 6 " is"' in summary
    assert tab.testid("error").is_hidden()

    # Exports: the JSON is the API's answer; the PNG a real image.
    with page.expect_download() as download:
        tab.testid("export-json").click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["response"]["hook_grids"] == answer["hook_grids"]
    with page.expect_download() as download:
        tab.testid("export-png").click()
    png = Path(download.value.path()).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    # Hover: the subject's last token at layer 0, where the fact sits, shows its exact value.
    page.hover("[data-testid=heatmap-post_block] rect.cell[data-layer='0'][data-position='5']")
    tip = page.locator("#tooltip")
    assert f"recovered = {post[0, 5, None]:.4f}" in tip.inner_text()
    assert 'position 5 "ror"' in tip.inner_text()
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if os.environ.get("PATCHSERVE_DOCS_IMAGES") == "1":
        shutil.copy(shot, REPO / "docs" / "images" / "dashboard.png")

    # The URL holds the study: opened afresh it runs it again, with the same cells.
    link = page.url
    assert "hooks=attn_out%2Cmlp_out%2Cpost_block" in link and "answer=+Pesmum" in link
    again = tab.page.context.new_page()
    again.goto(link)
    again.wait_for_selector("[data-testid=summary][data-state=done]", timeout=60_000)
    assert again.get_by_test_id("metric").input_value() == "recovered"
    second = Tab(again, tab.server)
    for hook in hooks:
        assert second.cells(hook) == tab.cells(hook)

    assert tab.errors == []
    assert tab.requests and tab.foreign_requests() == []


def test_attn_head_columns_are_positions_by_heads_at_half_alpha(tab: Tab) -> None:
    tab.open("?corrupt=The+capital+of+Sunror+is&hooks=attn_head,post_block&layers=0-1"
             "&positions=%22Sunror%22,-1&heads=all&metric=logit_diff&alpha=0.5")  # fmt: skip
    tab.wait_done()
    body = {
        "prompt": CORRUPT, "clean_prompt": CLEAN, "answer_token": " Pesmum",
        "foil_token": " Terzir", "metric": "logit_diff", "hooks": ["attn_head", "post_block"],
        "layers": [0, 1], "positions": [{"span": "Sunror"}, -1], "heads": "all", "alpha": 0.5,
    }  # fmt: skip
    answer = api_grids(tab.server, body)
    assert answer["heads"] == [0, 1, 2, 3]
    assert tab.filled("attn_head") == (2 * 3 * 4, 2 * 3 * 4)
    assert tab.filled("post_block") == (2 * 3, 2 * 3)
    assert_same(tab.cells("attn_head"), grid_cells(answer, "attn_head"))
    assert_same(tab.cells("post_block"), grid_cells(answer, "post_block"))
    heads = tab.page.eval_on_selector_all(
        "[data-testid=heatmap-attn_head] text", "els => els.map(e => e.textContent)"
    )
    assert [h for h in heads if h.startswith("h")][:8] == [f"h{k}" for k in (0, 1, 2, 3) * 2]
    assert tab.errors == [] and tab.foreign_requests() == []


def test_a_head_sweep_over_every_position_is_a_layer_by_head_map(tab: Tab) -> None:
    tab.open("?corrupt=The+capital+of+Sunror+is&hooks=attn_head&heads=all"
             "&metric=logit_diff&by_head=1")  # fmt: skip
    tab.wait_done()
    body = {
        "prompt": CORRUPT, "clean_prompt": CLEAN, "answer_token": " Pesmum",
        "foil_token": " Terzir", "metric": "logit_diff", "hook": "attn_head", "heads": "all",
        "per_position": False,
    }  # fmt: skip
    answer = api_grids(tab.server, body)
    rows = tab.page.eval_on_selector_all(
        "[data-testid=heatmap-attn_head] rect.cell",
        "els => els.map(e => [e.dataset.layer, e.dataset.head, e.dataset.value, e.dataset.state])",
    )
    page = {(int(layer), int(head)): float(value) for layer, head, value, _ in rows}
    expected = {
        (layer, head): answer["grid"][i][k]
        for i, layer in enumerate(answer["layers"])
        for k, head in enumerate(answer["heads"])
    }
    assert page.keys() == expected.keys() and tab.filled("attn_head") == (16, 16)
    for key, value in expected.items():
        assert page[key] == pytest.approx(value, abs=1e-9), key
    texts = tab.page.eval_on_selector_all(
        "[data-testid=heatmap-attn_head] text", "els => els.map(e => e.textContent)"
    )
    assert [t for t in texts if t[:1] == "h" and t[1:].isdigit()] == ["h0", "h1", "h2", "h3"]
    assert any(t.startswith("head (patched at all") for t in texts)
    assert tab.errors == [] and tab.foreign_requests() == []


def test_an_answer_of_several_tokens_is_labelled_and_graded_as_a_continuation(tab: Tab) -> None:
    """The form says what the server does with an answer of several tokens, and the summary
    shows the server's warning naming them."""
    from tokenizers import Tokenizer

    from patchserve.assets import default_model_path

    tab.open()
    label = tab.page.locator("label", has=tab.testid("answer")).inner_text()
    assert "several tokens: a continuation" in label and "one token" not in label
    raw = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    ids = raw.encode(" Pesmum Terzir", add_special_tokens=False).ids
    assert len(ids) == 2
    tab.testid("answer").fill(" Pesmum Terzir")
    tab.testid("layers").fill("0")
    tab.testid("run").click()
    tab.wait_done()
    warnings = tab.testid("summary-warnings").inner_text()
    assert f"answer_token ' Pesmum Terzir' is 2 tokens {ids}" in warnings
    assert "graded as a continuation" in warnings
    assert tab.errors == [] and tab.foreign_requests() == []


def test_a_bad_input_shows_the_servers_error(tab: Tab) -> None:
    tab.open()
    tab.testid("answer").fill(" Pesmum Terzir")  # two tokens: a continuation, which kl refuses
    tab.testid("metric").select_option("kl")
    tab.testid("run").click()
    error = tab.testid("error")
    error.wait_for(state="visible", timeout=30_000)
    with tab.server.client() as client:
        response = client.post(
            "/v1/patch_sweep",
            json={
                "prompt": CORRUPT,
                "clean_prompt": CLEAN,
                "answer_token": " Pesmum Terzir",
                "metric": "kl",
            },
        )
    assert response.status_code == 400
    detail = response.json()["error"]
    text = error.inner_text()
    assert detail["message"] in text and "Server error 400" in text
    assert f"param: {detail['param']}" in text
    assert tab.testid("summary").get_attribute("data-state") == "error"


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_cancel_stops_the_servers_work(tab: Tab) -> None:
    """A sweep of ~10 s on the demo model (4,512 cells), cancelled once cells arrive: the
    server goes idle."""
    filler = " ".join(["the old"] * 60)
    tab.open()
    tab.testid("clean").fill(f"{CLEAN} {filler} so")
    tab.testid("corrupt").fill(f"{CORRUPT} {filler} so")
    tab.testid("hooks").select_option(ALL_HOOKS)
    tab.testid("run").click()
    tab.page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=heatmap-post_block]')"
        "?.dataset.filled ?? 0) > 0",
        timeout=60_000,
    )
    server = psutil.Process(tab.server.process.pid)
    before = cpu_seconds(server)
    time.sleep(0.8)
    busy = cpu_seconds(server) - before  # ~0.8 s alone; less on a shared machine
    assert busy > 0.1, f"the server was not working on the sweep ({busy:.2f} s CPU in 0.8 s)"
    tab.testid("cancel").click()
    cancelled = time.monotonic()
    tab.page.wait_for_selector("[data-testid=summary][data-state=cancelled]", timeout=5_000)
    # Idle: a 0.3 s window with under 0.03 s of CPU; it must start within a second.
    samples = [(time.monotonic() - cancelled, cpu_seconds(server))]
    while samples[-1][0] < 2.5:
        time.sleep(0.1)
        samples.append((time.monotonic() - cancelled, cpu_seconds(server)))
    # The first sample after which the server used no more than 0.03 s of CPU in total.
    final = samples[-1][1]
    idle_at = next(t for t, used in samples if final - used <= 0.03)
    trace = " ".join(f"{t:.1f}s:{final - used:.2f}" for t, used in samples)
    assert idle_at <= 1.0, f"server busy {idle_at:.2f} s after the cancel (CPU left: {trace})"
    filled, total = tab.filled("post_block")
    assert 0 < filled < total  # it was filling live, and stopped
    assert tab.testid("error").is_hidden()
    # The server is fine afterwards (and nothing of the cancelled sweep was kept).
    with tab.server.client() as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/patch_source").json()["data"] == []


def test_stored_runs_listed_and_deleted(tab: Tab) -> None:
    tab.open()
    tab.page.locator("details summary").click()
    tab.testid("keep").check()
    tab.testid("run").click()
    tab.wait_done()
    runs = tab.testid("runs")
    item = runs.locator("li[data-run]")
    item.wait_for(timeout=10_000)
    name = item.get_attribute("data-run")
    with tab.server.client() as client:
        assert [r["run"] for r in client.get("/v1/patch_source").json()["data"]] == [name]
        item.get_by_test_id("delete-run").click()
        runs.locator("li[data-run]").wait_for(state="detached", timeout=10_000)
        assert client.get("/v1/patch_source").json()["data"] == []


def test_api_key_is_asked_once_and_kept_for_the_session(browser: Browser) -> None:
    server = start_server(None, "--api-key", "s3cret")
    try:
        assert httpx.get(f"{server.url}/").status_code == 200  # the page needs no key
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        asked: list[str] = []
        with new_tab(browser, server) as tab:

            def answer(dialog: Any) -> None:
                asked.append(dialog.message)
                dialog.accept("s3cret")

            tab.page.on("dialog", answer)
            tab.open()
            tab.testid("run").click()
            tab.wait_done()
            assert tab.filled("post_block") == (28, 28)
            assert len(asked) == 1 and "API key" in asked[0]
            assert tab.page.evaluate("sessionStorage.getItem('patchserve.apiKey')") == "s3cret"
            assert tab.errors == [] and tab.foreign_requests() == []
    finally:
        server.stop()


def test_unaligned_positions_are_hatched_skipped_cells(tab: Tab) -> None:
    corrupt = "The old capital city of Sunror is"  # 10 tokens against the clean 7
    tab.open("?corrupt=The+old+capital+city+of+Sunror+is&hooks=post_block&metric=recovered")
    tab.wait_done()
    body = {
        "prompt": corrupt, "clean_prompt": CLEAN, "answer_token": " Pesmum",
        "foil_token": " Terzir", "metric": "recovered", "hooks": ["post_block"],
    }  # fmt: skip
    answer = api_grids(tab.server, body)
    assert len(answer["skipped"]) == 4 * 7
    assert tab.filled("post_block") == (4 * 10, 4 * 10)
    assert_same(tab.cells("post_block"), grid_cells(answer, "post_block"))
    fills = tab.page.eval_on_selector_all(
        "[data-testid=heatmap-post_block] rect.cell[data-state=skipped]",
        "els => els.map(e => e.getAttribute('fill'))",
    )
    assert fills == ["url(#hatch-post_block)"] * (4 * 7)
    assert "skipped (no aligned clean token)" in tab.testid("legend").inner_text()
    assert "28 cells" in tab.testid("summary").inner_text()


def test_the_page_and_its_files_are_in_the_wheel(tmp_path: Path) -> None:
    """`pip install patchserve` serves the page: the files are package data."""
    tree = tmp_path / "src"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", str(tree), "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("patchserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    page = REPO / "src" / "patchserve" / "dashboard"
    shipped = {f"patchserve/dashboard/{f.name}" for f in page.iterdir()}
    assert shipped >= {"patchserve/dashboard/index.html", "patchserve/dashboard/app.js"}
    assert shipped <= names and "patchserve/server/routes/dashboard.py" in names


def test_clicking_token_chips_picks_positions(tab: Tab) -> None:
    tab.open()
    chip = tab.page.locator("[data-testid=chip]")
    chip.nth(5).wait_for()
    positions = tab.testid("positions")
    assert positions.input_value() == "all"
    chip.nth(5).click()
    assert positions.input_value() == "5"
    chip.nth(4).click()
    assert positions.input_value() == "4, 5"
    assert tab.page.eval_on_selector_all(
        ".chip.chosen", "els => els.map(e => e.dataset.position)"
    ) == ["4", "5"]
    chip.nth(5).click()
    assert positions.input_value() == "4"
    # Edited, the prompt is tokenized again by the server (" not" is " n" + "ot" here).
    tab.testid("corrupt").fill("The capital of Sunror is not")
    tab.page.wait_for_function("document.querySelectorAll('[data-testid=chip]').length === 9")
    assert chip.nth(8).text_content() == "8ot"


SSE_READER = """async () => {
  const { sseData } = await import('/dashboard/api.js');
  const enc = new TextEncoder();
  const e = enc.encode('data: "caf\\u00e9"\\n\\n');  // a two-byte character split in two
  const cut = e.indexOf(0xc3) + 1;
  const chunks = [enc.encode('data: {"a"'), enc.encode(': 1}\\r'), enc.encode('\\n\\r\\n: note\\n'),
    enc.encode('data: one\\ndata:two\\n\\n'), e.slice(0, cut), e.slice(cut),
    enc.encode('data: [DONE]\\n\\n')];
  const body = new ReadableStream({ start(c) { chunks.forEach((x) => c.enqueue(x)); c.close(); } });
  const out = [];
  for await (const d of sseData(new Response(body))) out.push(d);
  return out;
}"""

SCALES = """async (cases) => {
  const { scaleBounds } = await import('/dashboard/heatmap.js');
  return cases.map(([m, v, clean, corrupt]) => {
    const s = scaleBounds(m, v, clean, corrupt);
    return [s.low, Number.isNaN(s.mid) ? null : s.mid, s.high];
  });
}"""


def test_the_pages_stream_reader_and_colour_scale_match_the_python_ones(tab: Tab) -> None:
    tab.open()
    # The hand-written SSE framing: chunks split anywhere, CRLF, comments, multi-line data.
    assert tab.page.evaluate(SSE_READER) == ['{"a": 1}', "one\ntwo", '"café"', "[DONE]"]
    cases = [
        ("recovered", [0.2, 1.4, -0.3], 20.5, -20.1),
        ("kl", [3.4, 0.0, 11.3], 0.0, 20.07),
        ("kl", [25.0, 1.0], 0.0, 20.07),
        ("logit_diff", [2.3, -19.6, 12.4], 20.57, -20.07),
        ("logprob", [-3.4, -0.01], -0.0005, -20.07),
        ("prob", [0.03, 0.5], 0.9995, 1.9e-9),
        ("logit_diff", [1.0, 2.0], None, 1.5),
    ]
    page = tab.page.evaluate(SCALES, [list(c) for c in cases])
    for (metric, values, clean, corrupt), got in zip(cases, page, strict=True):
        low, mid, high = scale_bounds(metric, np.array(values), clean, corrupt)
        assert got[0] == pytest.approx(low) and got[2] == pytest.approx(high), metric
        assert (got[1] is None) == math.isnan(mid)
        assert got[1] is None or got[1] == pytest.approx(mid)


def test_noise_tracing_with_a_window_from_the_form(tab: Tab) -> None:
    tab.open("?noise=Rorsun&window=2&hooks=mlp_out&metric=prob&positions=all&layers=all")
    tab.testid("run").click()
    tab.wait_done()
    assert (
        tab.testid("noise").input_value() == "Rorsun" and tab.testid("window").input_value() == "2"
    )
    body = {
        "prompt": CLEAN, "corruption": {"type": "noise", "span": "Rorsun", "samples": 10,
        "seed": 0}, "window": 2, "hooks": ["mlp_out"], "metric": "prob", "layers": "all",
        "positions": "all_prompt", "answer_token": " Pesmum", "foil_token": " Terzir",
    }  # fmt: skip
    answer = api_grids(tab.server, body)
    assert answer["window"] == 2 and answer["noise"]["samples"] == 10
    assert_same(tab.cells("mlp_out"), grid_cells(answer, "mlp_out"))
    assert tab.errors == []


def test_hooks_the_model_lacks_are_offered_disabled(browser: Browser) -> None:
    """On the transformers runtime the page offers only the hooks /v1/models lists; a study
    over what it offers runs as on the native runtime."""
    server = start_server(None, "--runtime", "transformers")
    try:
        with server.client() as client:
            card = client.get("/v1/models").json()["data"][0]
        assert card["runtime"] == "transformers" and "post_attn" not in card["hooks"]
        with new_tab(browser, server) as tab:
            tab.open("?hooks=post_attn,post_block")
            options = tab.page.eval_on_selector_all(
                "[data-testid=hooks] option, #hooks option",
                "els => els.map(e => [e.value, e.disabled, e.selected])",
            )
            state = {value: (disabled, selected) for value, disabled, selected in options}
            assert state["post_attn"] == (True, False)  # asked for in the URL, not available
            assert state["post_block"] == (False, True)
            assert all(not state[h][0] for h in card["hooks"])
            assert "transformers runtime" in tab.page.inner_text("#model")
            tab.testid("run").click()
            tab.wait_done()
            assert tab.filled("post_block") == (28, 28)
            assert tab.errors == []
    finally:
        server.stop()
