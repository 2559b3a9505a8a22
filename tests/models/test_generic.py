"""The transformers runtime (models/generic/) on architectures with no native family.

Expected values come from a separate ``transformers`` model of the same checkpoint (eager
attention): its logits, its module outputs, and a naive oracle — one full forward per
sweep cell with the site written by a module hook.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from checkpoints import build_checkpoint, load_reference
from engine.oracles import graded
from generic_checkpoints import GENERIC, build_generic_checkpoint
from patchserve.engine import InvalidArgument
from patchserve.engine.generation import GenerationRequest, generate
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.models import CheckpointError, LoadedModel, load_model
from patchserve.models.generic.probe import PROBE_TOKENS
from patchserve.text.tokenizer import Tokenizer

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"
TOL = 1e-4
ALL_BUT_POST_ATTN = ("pre_attn", "attn_out", "mlp_in", "mlp_out", "post_block", "attn_head")
#: What the module tree gives exactly: GLM-4 norms each branch's output before adding it.
EXPECTED_HOOKS = {
    "glm4": ("pre_attn", "post_block", "attn_head"),
    "exaone4": ("pre_attn", "post_block", "attn_head"),  # norms after each branch too
}
#: The oracle's own map of where each site lives (layers, attention, MLP, output projection).
ORACLE_MODULES = {"gpt_bigcode": ("transformer.h", "attn", "mlp", "c_proj")}
LLAMA_LIKE = ("model.layers", "self_attn", "mlp", "o_proj")


@pytest.fixture(scope="module", params=GENERIC)
def generic(request: pytest.FixtureRequest, checkpoint_root: Path) -> tuple[str, Path]:
    return request.param, build_generic_checkpoint(request.param, checkpoint_root)


@cache
def _loaded(folder: Path, runtime: str = "auto") -> LoadedModel:
    return load_model(folder, runtime=runtime)


@cache
def _reference(folder: Path):
    return load_reference(folder)


def _path(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _site_module(ref, name: str, layer: int, hook: str) -> tuple[torch.nn.Module, str]:
    """The module whose input ("in") or output ("out") is ``hook`` in the reference model."""
    layers, attn, mlp, proj = ORACLE_MODULES.get(name, LLAMA_LIKE)
    block = _path(ref, layers)[layer]
    where = {
        "pre_attn": (block, "in"),
        "post_block": (block, "out"),
        "attn_out": (getattr(block, attn), "out"),
        "mlp_in": (getattr(block, mlp), "in"),
        "mlp_out": (getattr(block, mlp), "out"),
        "attn_head": (getattr(getattr(block, attn), proj), "in"),
    }
    return where[hook]


def oracle_logits(ref, name, ids, hook, layer, position, source, head=None) -> torch.Tensor:
    """Last-position logits of a full ``transformers`` forward with one site overwritten."""
    module, side = _site_module(ref, name, layer, hook)
    heads = ref.config.num_attention_heads

    def write(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if head is None:
            t[:, position] = source
        else:
            view = t.view(*t.shape[:-1], heads, -1)
            view[:, position, head] = source
        return t

    def on_output(_m, _args, output):
        return (
            write(output) if isinstance(output, torch.Tensor) else (write(output[0]), *output[1:])
        )

    def on_input(_m, args, kwargs):
        if args:
            return (write(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}

    if side == "out":
        handle = module.register_forward_hook(on_output)
    else:
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0, -1:]
    finally:
        handle.remove()


def test_architectures_fall_back_to_transformers_with_the_hooks_they_can_give(generic):
    name, folder = generic
    loaded = _loaded(folder)
    assert loaded.runtime == "transformers"
    assert loaded.model.runtime == "transformers"
    assert "has no native family; serving through transformers" in (loaded.fallback or "")
    assert loaded.hooks == EXPECTED_HOOKS.get(name, ALL_BUT_POST_ATTN)
    assert "post_attn" not in loaded.hooks


def test_logits_equal_transformers(generic):
    _, folder = generic
    model, ref = _loaded(folder).model, _reference(folder)
    ids = torch.tensor([Tokenizer.from_folder(folder).encode(CLEAN).ids])
    with torch.no_grad():
        expected = ref(ids).logits[0]
    out = model.prefill(ids)
    torch.testing.assert_close(out.logits[0], expected[-1], atol=TOL, rtol=0)
    torch.testing.assert_close(model(ids)[0], expected, atol=TOL, rtol=0)
    split = model.extend(ids[:, 7:], model.prefill(ids[:, :7]).cache)
    torch.testing.assert_close(split.logits[0], expected[-1], atol=TOL, rtol=0)


def test_captures_equal_transformers_module_outputs(generic):
    name, folder = generic
    loaded, ref = _loaded(folder), _reference(folder)
    ids = Tokenizer.from_folder(folder).encode(CLEAN).ids
    n = loaded.config.num_layers
    run = capture_run(loaded.model, "c", CLEAN, ids, {h: list(range(n)) for h in loaded.hooks})
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for layer in range(n):
        for hook in loaded.hooks:
            module, side = _site_module(ref, name, layer, hook)

            def record(_m, args, kwargs_or_out, key=(hook, layer), side=side):
                if side == "in":
                    t = args[0] if args else kwargs_or_out["hidden_states"]
                else:
                    out = kwargs_or_out
                    t = out if isinstance(out, torch.Tensor) else out[0]
                seen[key] = t[0].detach().clone()

            if side == "in":
                handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        ref(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    for (hook, layer), expected in seen.items():
        got = run.activations[hook, layer]
        if hook == "attn_head":
            got = got.flatten(-2)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0, msg=f"{hook}@{layer}")


def test_sweep_at_every_offered_hook_equals_the_naive_transformers_oracle(generic):
    name, folder = generic
    loaded, ref = _loaded(folder), _reference(folder)
    model, tok = loaded.model, Tokenizer.from_folder(folder)
    n = model.cfg.num_layers
    run = capture_run(
        model, "clean", CLEAN, tok.encode(CLEAN).ids, {h: list(range(n)) for h in loaded.hooks}
    )
    heads = [0, model.cfg.num_heads - 1]
    spec, _ = prepare_sweep(
        model, tok, prompt=CORRUPT, source=run, hooks=list(loaded.hooks), heads=heads
    )
    outcome = run_sweep(model, spec)
    assert outcome.stats["computed"] > 0
    # answer and baselines from transformers' own forwards of both prompts
    with torch.inference_mode():
        clean_logits = ref(torch.tensor([run.token_ids])).logits[0, -1]
        corrupt_logits = ref(torch.tensor([spec.corrupt_ids])).logits[0, -1]
    grader = graded(spec.metric, clean_logits, corrupt_logits, spec.answer, spec.foil)
    assert outcome.answer == grader.answer
    checked = 0
    for hook in spec.hooks:
        for i, layer in enumerate(spec.layers):
            for j, pos in enumerate(spec.positions):
                for k, head in enumerate(heads if hook == "attn_head" else [None]):
                    value = outcome.grids[hook][i][j]
                    value = value if head is None else value[k]
                    source = run.row(hook, layer, pos)
                    source = source if head is None else source[head]
                    logits = oracle_logits(
                        ref, name, spec.corrupt_ids, hook, layer, pos, source, head
                    )
                    expected = float(grader(logits)[0])
                    assert value == pytest.approx(expected, abs=TOL), (hook, layer, pos, head)
                    checked += 1
    assert checked > 0
    assert outcome.noise_floor < 1e-4


def test_hooks_it_cannot_give_are_refused_naming_the_ones_it_has(generic):
    _, folder = generic
    loaded = _loaded(folder)
    model, tok = loaded.model, Tokenizer.from_folder(folder)
    refused = [h for h in ("post_attn", "attn_out", "mlp_out") if h not in loaded.hooks]
    for hook in refused:
        with pytest.raises(InvalidArgument) as info:
            prepare_sweep(model, tok, prompt=CORRUPT, source=None, hooks=[hook])
        message = info.value.message
        assert f"hook {hook!r} is not available" in message
        assert "transformers runtime" in message
        assert ", ".join(loaded.hooks) in message
    with pytest.raises(InvalidArgument, match="post_attn"):  # also at the pass itself
        from patchserve.models import HookContext

        model.prefill(torch.tensor([[5, 6, 7]]), HookContext.build(capture=[(0, "post_attn")]))


def test_greedy_generation_equals_transformers_generate(generic):
    _, folder = generic
    model, ref = _loaded(folder).model, _reference(folder)
    tok = Tokenizer.from_folder(folder)
    prompt = tok.encode(CLEAN).ids
    result = generate(
        model, tok, GenerationRequest(prompt_ids=prompt, max_tokens=6, temperature=0.0)
    )
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    assert result.token_ids == expected[: len(result.token_ids)]
    assert len(result.token_ids) == 6 or result.finish_reason == "stop"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"answer_token_id": [5, 9, 11]},  # a multi-token answer: blocks over appended tails
        {"window": 3, "positions": [0, 2, -1]},  # several layers restored at once
        {"hooks": ["attn_head"], "per_position": False, "heads": [0, 2]},
        {"max_batch_tokens": 16},  # many small batches
    ],
    ids=["grid", "multi_token", "window", "heads_all_positions", "small_batches"],
)
def test_runtime_transformers_on_a_native_architecture_gives_the_native_grid(
    checkpoint_root, extra
):
    folder = build_checkpoint("llama", checkpoint_root)
    native, generic = _loaded(folder, "native"), _loaded(folder, "transformers")
    assert native.runtime == "native" and generic.runtime == "transformers"
    assert generic.fallback is None
    assert generic.hooks == ALL_BUT_POST_ATTN
    tok = Tokenizer.from_folder(folder)
    n = native.config.num_layers
    kwargs = {"hooks": list(ALL_BUT_POST_ATTN), "heads": [1, 3], **extra}
    grids = []
    for loaded in (native, generic):
        ids = tok.encode(CLEAN).ids
        every = {h: list(range(n)) for h in ALL_BUT_POST_ATTN}
        run = capture_run(loaded.model, "clean", CLEAN, ids, every)
        spec, _ = prepare_sweep(loaded.model, tok, prompt=CORRUPT, source=run, **kwargs)
        grids.append(run_sweep(loaded.model, spec).grids)
    for hook in kwargs["hooks"]:
        mine = torch.tensor(grids[1][hook], dtype=torch.float64)
        theirs = torch.tensor(grids[0][hook], dtype=torch.float64)
        torch.testing.assert_close(mine, theirs, atol=TOL, rtol=0, msg=hook)


def test_rows_at_different_offsets_in_one_forward_equal_one_forward_per_offset(generic):
    _, folder = generic
    loaded = _loaded(folder)
    model, tok = loaded.model, Tokenizer.from_folder(folder)
    if not model.batch_offsets:  # refused by the probe: only where a short window binds
        assert model.window is not None and model.window < PROBE_TOKENS
        return
    n = model.cfg.num_layers
    run = capture_run(
        model, "clean", CLEAN, tok.encode(CLEAN).ids, {h: list(range(n)) for h in loaded.hooks}
    )
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, hooks=list(loaded.hooks))
    together = run_sweep(model, spec).grids
    model.batch_offsets = False
    try:
        apart = run_sweep(model, spec).grids
    finally:
        model.batch_offsets = True
    for hook in loaded.hooks:
        mine = torch.tensor(together[hook], dtype=torch.float64)
        theirs = torch.tensor(apart[hook], dtype=torch.float64)
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0, msg=hook)


def test_what_the_transformers_runtime_cannot_compute_exactly_is_refused(generic):
    name, folder = generic
    model, tok = _loaded(folder).model, Tokenizer.from_folder(folder)
    from patchserve.engine.service import Study, StudyResources
    from patchserve.wire.requests import PatchSweepRequest

    res = StudyResources(model=model, tokenizer=tok, model_name=name)
    for extra, param in (
        ({"clean_prompt": CLEAN, "method": "attribution"}, "method"),
        ({"corruption": {"type": "noise", "span": "John", "samples": 2}}, "corruption"),
    ):
        req = PatchSweepRequest(prompt=CORRUPT, hook="post_block", **extra)
        with pytest.raises(InvalidArgument) as info:
            Study(res, req)
        assert info.value.param == param
        assert "transformers runtime" in info.value.message
    with pytest.raises(CheckpointError, match="device maps are not supported"):
        load_model(folder, device_map="cpu:0-1,cpu:2-2")


def test_auto_runtime_is_native_for_registered_architectures_else_transformers():
    from patchserve.models.loading import choose_runtime

    assert choose_runtime({"architectures": ["LlamaForCausalLM"]}) == ("native", None)
    runtime, why = choose_runtime({"architectures": ["Glm4ForCausalLM"]})
    assert runtime == "transformers"
    assert why == "architecture Glm4ForCausalLM has no native family; serving through transformers"
    assert choose_runtime({"architectures": ["Glm4ForCausalLM"]}, "native") == ("native", None)
    assert choose_runtime({"architectures": ["LlamaForCausalLM"]}, "transformers") == (
        "transformers",
        None,
    )
    with pytest.raises(CheckpointError, match="unknown runtime 'jax'"):
        choose_runtime({}, "jax")
