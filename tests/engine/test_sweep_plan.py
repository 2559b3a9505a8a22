"""The sweep planner alone: pure functions of offsets, lanes and the budget (no model, no torch).

Expected batches are worked out by hand from the rule: rows sorted by offset
(stable), a row of offset ``p`` costs ``lane - p`` tokens per lane, a batch is
closed when the next row would pass the budget (at least one whole row of every
lane) or the attention-score cap.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from patchserve.engine import sweep_plan
from patchserve.engine.sweep_plan import (
    AttentionShape,
    Batch,
    ResumeKey,
    pack,
    plan_batches,
    reaches_last_position,
    resume_point,
)

SMALL = AttentionShape(num_heads=4, head_dim=16, softcapped=False)


def test_rows_go_longest_first_and_close_a_batch_at_the_budget():
    # sorted: #1 (offset 0, 10 tokens), #3 (7), #0 (5), #2 (2); budget 12
    assert pack([5, 0, 8, 3], [10], 12, SMALL) == [[1], [3, 0], [2]]


def test_equal_offsets_keep_their_planning_order():
    assert pack([4, 2, 4, 2], [6], 100, SMALL) == [[1, 3, 0, 2]]


def test_the_budget_holds_at_least_one_row_of_every_lane():
    # lanes 4 and 6: offset 0 costs 10, 2 costs 6, 3 costs 4; budget max(1, 2 * 6) = 12
    assert pack([0, 2, 3], [4, 6], 1, SMALL) == [[0], [1, 2]]


def test_the_score_cap_splits_soft_capped_models_by_length_squared():
    # length 10, 130000 heads: two rows hold 2 * 130000 * 10 * 10 = 26.0e6 scores
    # written out (> 24 * 2**20 = 25.2e6), but only 2 * 130000 * 10 * 1 under flash
    capped = AttentionShape(num_heads=130000, head_dim=1, softcapped=True)
    flash = AttentionShape(num_heads=130000, head_dim=1, softcapped=False)
    assert 2 * 130000 * 10 * 10 > sweep_plan.SCORE_ELEMENTS_CAP >= 130000 * 10 * 10
    assert pack([0, 0, 0], [10], 10**6, capped) == [[0], [1], [2]]
    assert pack([0, 0, 0], [10], 10**6, flash) == [[0, 1, 2]]


def test_groups_keep_first_seen_order_and_the_first_inner_batch_carries_the_probe():
    unembed = ResumeKey(4, "pre_attn", "post_block", None, ())  # start == num_layers
    early = ResumeKey(1, "pre_attn", "pre_attn", None, ())
    late = ResumeKey(3, "mlp_out", "mlp_out", "attn_out", ())
    rows = [(unembed, 9), (early, 2), (unembed, 9), (early, 0), (late, 5)]
    plan = plan_batches(rows, [10], 100, SMALL, num_layers=4)
    assert plan == [
        Batch(unembed, [0, 2], probe=False),
        Batch(early, [3, 1], probe=True),
        Batch(late, [4], probe=False),
    ]
    no_probe = plan_batches(rows, [10], 100, SMALL, num_layers=4, probe=False)
    assert [b.probe for b in no_probe] == [False, False, False]
    assert plan_batches([], [10], 100, SMALL, num_layers=4) == []


def test_a_group_over_the_budget_becomes_several_batches_in_order():
    key = ResumeKey(0, "pre_attn", "pre_attn", None, (1,))
    plan = plan_batches([(key, 3), (key, 0), (key, 1)], [8], 8, SMALL, num_layers=2)
    # sorted #1 (8 tokens), #2 (7), #0 (5); budget 8: one row a batch
    assert plan == [Batch(key, [1], True), Batch(key, [2]), Batch(key, [0])]


def test_resume_points():
    assert resume_point("pre_attn", 2) == (2, "pre_attn", None)
    assert resume_point("post_block", 2) == (3, "pre_attn", None)
    assert resume_point("attn_head", 2) == (2, "attn_head", "attn_head")
    for hook in ("attn_out", "post_attn", "mlp_in", "mlp_out"):
        assert resume_point(hook, 2) == (2, hook, "attn_out")


def test_only_the_last_position_is_reached_from_the_last_block_after_attention():
    assert reaches_last_position("mlp_out", 3, 9, 4, 10)  # the last position itself
    assert not reaches_last_position("mlp_out", 3, 5, 4, 10)  # last block, after attention
    assert not reaches_last_position("post_block", 3, 5, 4, 10)
    assert reaches_last_position("pre_attn", 3, 5, 4, 10)  # its attention mixes positions
    assert reaches_last_position("mlp_out", 2, 5, 4, 10)  # a later block's attention does


def test_the_planner_imports_no_torch():
    path = Path(sweep_plan.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('plan', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['plan'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'patchserve' not in sys.modules, 'patchserve imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
