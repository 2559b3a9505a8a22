"""``PatchStudy(...).sweep_layers_positions(method=...)``: which cells are exact."""

from __future__ import annotations

import numpy as np
import pytest
from client_prompts import CLEAN, CORRUPT


def test_verified_results_say_which_cells_are_exact(study):
    events = []
    result = study.sweep_layers_positions(
        CORRUPT,
        clean_prompt=CLEAN,
        method="attribution+verify",
        verify_top_k=2,
        on_cell=events.append,
    )
    assert result.method == "attribution+verify"
    exact = result.exact_mask()
    assert exact.shape == result.to_numpy().shape
    assert 2 <= exact.sum() < exact.size
    assert sum(e["kind"] == "exact" for e in events) == exact.sum()
    estimate = study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, method="attribution")
    assert not estimate.exact_mask().any()
    values = result.to_numpy()
    np.testing.assert_array_equal(values[~exact], estimate.to_numpy()[~exact])


def test_exact_sweeps_are_exact_everywhere_and_the_per_cell_path_refuses_estimates(study):
    result = study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, layers=[0])
    assert result.method == "exact" and result.exact_mask().all()
    with pytest.raises(ValueError, match="server-side"):
        study.sweep_layers_positions(CORRUPT, run="x", server_side=False, method="attribution")
