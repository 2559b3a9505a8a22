"""``patchserve sweep`` on the bundled model: table, PNG and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from patchserve.assets import default_model_path


def test_sweep_on_the_bundled_model_prints_the_table_and_writes_png_and_json(tmp_path):
    example = json.loads((default_model_path() / "examples.json").read_text())[0]
    png, out = tmp_path / "heatmap.png", tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchserve.cli.main",
            "sweep",
            "--clean",
            example["clean"],
            "--corrupt",
            example["corrupt"],
            "--answer",
            example["answer"],
            "--foil",
            example["foil"],
            "--metric",
            "recovered",
            "--out",
            str(png),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert done.returncode == 0, done.stderr
    assert "post_block — recovered" in done.stdout and "top 5 cells" in done.stdout
    body = json.loads(out.read_text())
    # 'recovered' reports the raw baselines (logit differences with a foil), as the seed does.
    assert body["clean"] > body["corrupt"]
    assert body["baselines"]["clean"]["value"] == body["clean"]
    assert max(max(v for v in row if v is not None) for row in body["grid"]) >= 0.8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_arguments_fail_cleanly(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchserve.cli.main",
            "sweep",
            "--clean",
            "a",
            "--corrupt",
            "b",
            "--layers",
            "x-y",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "bad layers" in done.stderr


EXAMPLE = json.loads((default_model_path() / "examples.json").read_text())[0]


def patchserve(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m patchserve ARGS`` (the package's own entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "patchserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "250"},
    )


def study_args(*extra: str) -> list[str]:
    return ["sweep", "--clean", EXAMPLE["clean"], "--corrupt", EXAMPLE["corrupt"], *extra]


def test_a_negative_top_is_refused_not_sliced():
    done = patchserve(*study_args("--top", "-3"))
    assert done.returncode == 2 and "--top: '-3' is not a whole number >= 0" in done.stderr
    assert "top -3 cells" not in done.stdout


def test_version_module_entry_point_and_type_marker():
    import patchserve as package

    assert (Path(package.__file__).parent / "py.typed").is_file()  # PEP 561: typed package
    done = patchserve("--version")
    assert done.returncode == 0 and done.stdout.strip() == "patchserve 0.1.0"
    help_text = patchserve("serve", "--help").stdout
    assert "(default: 2048)" in help_text and "--max-prompt-tokens" in help_text


def test_user_mistakes_are_one_line_and_exit_2(tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((default_model_path() / name).read_bytes())
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    cases = [
        (study_args("--layers", "9"), "layer 9 is out of range"),
        (study_args("--layers", "-1"), "bad layers '-1'"),
        (study_args("--hooks", "attn_head", "--heads", "two"), "bad head 'two'"),
        (study_args("--hooks", "blocks.0.hook_resid_post"), "layers=[0]"),
        (study_args("--url", "http://127.0.0.1:9"), "cannot reach http://127.0.0.1:9"),
        (study_args("--model", str(no_tokenizer)), "has no tokenizer: it needs tokenizer.json"),
        (study_args("--model", str(unsupported)), "MambaForCausalLM"),
    ]
    for args, words in cases:
        done = patchserve(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_kl_top_cells_are_the_lowest_and_warnings_are_printed(tmp_path):
    out = tmp_path / "kl.json"
    done = patchserve(*study_args("--metric", "kl", "--answer", "Pesmum", "--json", str(out)))
    assert done.returncode == 0, done.stderr
    assert "top 5 cells (lowest kl first)" in done.stdout
    listed = [float(line.split()[0]) for line in done.stdout.split("first):")[1].splitlines()[1:6]]
    assert listed == sorted(listed)
    body = json.loads(out.read_text())
    assert listed[0] == round(body["argmax"]["value"], 4)
    assert "warning: answer_token 'Pesmum'" in done.stdout


def test_two_hooks_go_into_one_figure(tmp_path):
    import matplotlib.pyplot as plt

    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert patchserve(*study_args("--hooks", "mlp_out", "--out", str(one))).returncode == 0
    assert patchserve(*study_args("--hooks", "attn_out,mlp_out", "--out", str(two))).returncode == 0
    assert plt.imread(two).shape[0] > 1.6 * plt.imread(one).shape[0]  # two panels, stacked


def test_head_grid_and_multi_token_answer(tmp_path):
    """--no-per-position prints one row per layer and one column per head; --answer-ids
    grades a continuation and the body reports its ids."""
    out = tmp_path / "heads.json"
    args = ("--hooks", "attn_head", "--no-per-position", "--metric", "logit_diff")
    ids = ("--answer-ids", "877,14", "--foil-ids", "935,14", "--json", str(out))
    done = patchserve(*study_args(*args, *ids))
    assert done.returncode == 0, done.stderr
    assert "attn_head (every position) — logit_diff" in done.stdout
    assert "H3" in done.stdout and "(every position)" in done.stdout.split("first):")[1]
    body = json.loads(out.read_text())
    assert body["answer_token_ids"] == [877, 14] and body["foil_token_ids"] == [935, 14]
    assert len(body["grid"]) == 4 and all(len(row) == 4 for row in body["grid"])
    best = body["argmax"]
    listed = done.stdout.split("first):")[1].splitlines()[1]
    assert f"layer {best['layer']} head {best['head']} (every position)" in listed
    # --heads takes the API's "all" as well as numbers and ranges.
    every = patchserve(*study_args(*args, *ids, "--heads", "all"))
    assert every.returncode == 0, every.stderr
    assert json.loads(out.read_text())["heads"] == [0, 1, 2, 3]
    some = patchserve(*study_args(*args, *ids, "--heads", "0,2-3"))
    assert some.returncode == 0, some.stderr
    assert json.loads(out.read_text())["heads"] == [0, 2, 3]
    wrong = patchserve(*study_args("--no-per-position"))
    assert wrong.returncode == 2 and "per_position applies to the attn_head hook" in wrong.stderr


def test_negative_positions_count_from_the_end_as_in_the_api(tmp_path):
    """``--positions span:Sunror -1``: -1 is the last token (it was a "bad position"), and a
    comma list of negative ones is a value, not an unknown option."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    encoding = raw.encode(EXAMPLE["corrupt"])
    start = EXAMPLE["corrupt"].index("Sunror")
    subject = [i for i, (a, b) in enumerate(encoding.offsets) if a < start + 6 and b > start]
    n = len(encoding.ids)
    assert subject and n - 1 not in subject
    out = tmp_path / "out.json"
    cases = [
        (["span:Sunror", "-1"], [*subject, n - 1]),
        (["-2,-1"], [n - 2, n - 1]),
        (["0,-1"], [0, n - 1]),
    ]
    for positions, expected in cases:
        done = patchserve(
            *study_args("--layers", "0", "--positions", *positions, "--json", str(out))
        )
        assert done.returncode == 0, (positions, done.stderr)
        assert json.loads(out.read_text())["positions"] == expected, positions
    wrong = patchserve(*study_args("--positions", "3,-1x"))
    assert wrong.returncode == 2 and "bad position '-1x'" in wrong.stderr
