"""One site check and one name rule, used by every route that names a site or a name."""

from __future__ import annotations

import pytest

from models.helpers import loaded
from patchserve.engine.runs import check_name
from patchserve.engine.sites import check_layer, check_site
from patchserve.errors import InvalidArgument


def test_site_checks(family_checkpoint):
    cfg = loaded(family_checkpoint).model.cfg
    assert check_site(cfg, 0, "post_block", None, "p") == cfg.hidden_size
    assert check_site(cfg, cfg.num_layers - 1, "attn_head", 0, "p") == cfg.head_dim
    bad = [
        (cfg.num_layers, "post_block", None, "out of range"),
        (-1, "post_block", None, "out of range"),
        (True, "post_block", None, "out of range"),
        (0, "resid", None, "unknown hook"),
        (0, "attn_head", None, "attn_head hook, and only for it"),
        (0, "mlp_out", 0, "attn_head hook, and only for it"),
        (0, "attn_head", cfg.num_heads, "query heads"),
    ]
    for layer, hook, head, words in bad:
        with pytest.raises(InvalidArgument, match=words) as info:
            check_site(cfg, layer, hook, head, "patch.0")
        assert info.value.param == "patch.0"
    assert check_layer(cfg, 1, "x") == 1


@pytest.mark.parametrize("name", ["run-1", "A.b_c", "x" * 128])
def test_names_that_are_safe_file_names_pass(name):
    assert check_name(name, "name", "module") == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a..b", "x" * 129, "naïve"])
def test_other_names_are_rejected_with_what_they_name(name):
    with pytest.raises(InvalidArgument, match="invalid module name"):
        check_name(name, "name", "module")
