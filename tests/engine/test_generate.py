"""Generation with interventions, checked against transformers and against no-cache references.

Every reference here is independent of the decoding loop: Hugging Face
``generate`` (greedy) or a transformers forward on the same checkpoint, a full
forward of prompt + generated tokens at every step (no cache), or one full
forward over a generated path (teacher forcing), with the same edits and
steering applied as plain full-forward hooks. Random tiny models repeat
themselves under greedy decoding, so the logprob checks follow seeded sampled
paths, which move.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoints import build_checkpoint, load_reference, reference_modules
from models.helpers import PROMPT, loaded, tokenizer
from patchserve.engine.errors import InvalidArgument
from patchserve.engine.generation import (
    GenerationRequest,
    GenerationResult,
    SteerVector,
    apply_chat_template,
    generate,
    sample,
)
from patchserve.models import HookContext, SiteEdit, Transformer, make_edit
from patchserve.server.openai import completion_logprobs
from patchserve.text.tokenizer import Tokenizer

EOS = 1
TOL = 1e-4  # against transformers (as in tests/models/test_parity.py)


def folder_of(family: str, root: Path) -> Path:
    return build_checkpoint(family, root)


def prompt_ids(folder: Path, text: str = PROMPT) -> list[int]:
    return tokenizer(folder).encode(text).ids


def steer_edits(steer: Sequence[SteerVector], t: int) -> list[SiteEdit]:
    """Steering as plain additive edits at positions ``0 .. t-1``."""
    return [
        make_edit(
            s.layer,
            s.hook,
            [0] * t,
            range(t),
            s.vector,
            alpha=s.scale,
            heads=None if s.head is None else [s.head] * t,
            kind="add",
        )
        for s in steer
    ]


def reference(
    model: Transformer,
    prompt: list[int],
    n: int,
    edits: Sequence[SiteEdit] = (),
    steer: Sequence[SteerVector] = (),
) -> list[int]:
    """Greedy tokens from a full forward of prompt + generated tokens at every step (no cache)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            hooks = HookContext.build([*edits, *steer_edits(steer, len(ids))])
            logits = model.prefill(torch.tensor([ids]), hooks).logits
            ids.append(int(torch.argmax(logits[0])))
    return ids[len(prompt) :]


def forced(
    model: Transformer,
    prompt: list[int],
    tokens: list[int],
    edits: Sequence[SiteEdit] = (),
    steer: Sequence[SteerVector] = (),
) -> torch.Tensor:
    """Log-probabilities ``[n, V]`` behind each of ``tokens``, from one full forward.

    Causality makes this equal to stepwise forwards: an edit at position ``p``
    only reaches positions ``>= p``.
    """
    ids = [*prompt, *tokens[:-1]]
    hooks = HookContext.build([*edits, *steer_edits(steer, len(ids))])
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), hooks)[0]
    return torch.log_softmax(logits[len(prompt) - 1 :].float(), -1)


def as_matrix(requested: list[dict[int, float]]) -> torch.Tensor:
    return torch.tensor([[row[i] for i in range(len(row))] for row in requested])


def shaped(folder: Path, out: GenerationResult) -> dict[str, Any]:
    """The OpenAI legacy ``logprobs`` object of a result, as the server sends it."""
    assert out.logprobs is not None
    return completion_logprobs(tokenizer(folder), out.logprobs).model_dump()


def run(folder: Path, n: int = 8, **kwargs: Any) -> GenerationResult:
    kwargs.setdefault("temperature", 0)
    req = GenerationRequest(prompt_ids=prompt_ids(folder), max_tokens=n, **kwargs)
    return generate(loaded(folder).model, tokenizer(folder), req)


def sampled(folder: Path, n: int = 10, seed: int = 0, **kwargs: Any) -> GenerationResult:
    """A seeded sampled path (random tiny models repeat themselves under greedy decoding)."""
    vocab = loaded(folder).model.cfg.vocab_size
    return run(folder, n, temperature=0.8, seed=seed, logprob_token_ids=range(vocab), **kwargs)


# ---------------------------------------------------------------------------- exactness


def _transformers_greedy(ref: Any, folder: Path, n: int) -> tuple[list[int], bool]:
    """``transformers``' greedy ``generate`` of the prompt on ``ref``: its tokens cut at EOS,
    and whether it stopped there."""
    ids = torch.tensor([prompt_ids(folder)])
    with torch.inference_mode():
        out = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=2,
            eos_token_id=EOS,
        )
    theirs = out[0, ids.shape[1] :].tolist()
    return (theirs[: theirs.index(EOS)], True) if EOS in theirs else (theirs, False)


def test_greedy_matches_transformers_generate(family_checkpoint):
    folder = family_checkpoint
    n = 12
    ours = run(folder, n, stop_token_ids=[EOS])
    theirs, stopped = _transformers_greedy(load_reference(folder), folder, n)
    assert ours.finish_reason == ("stop" if stopped else "length")
    assert ours.token_ids == theirs
    assert ours.text == tokenizer(folder).decode(theirs)


def test_steered_greedy_matches_transformers_generate_with_a_hook(family_checkpoint):
    """A steering vector at ``post_block`` equals ``transformers``' ``generate`` with the same
    vector added to the decoder layer's output by a forward hook, token for token."""
    folder = family_checkpoint
    model = loaded(folder).model
    layer, scale, n = model.cfg.num_layers // 2, 1.5, 12
    vec = 6 * torch.randn(model.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    ours = run(
        folder, n, stop_token_ids=[EOS], steer=[SteerVector(layer, "post_block", vec, scale)]
    )
    ref = load_reference(folder)
    plain, _ = _transformers_greedy(ref, folder, n)
    layers, _, _ = reference_modules(ref, folder.name)

    def add(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + scale * vec, *output[1:])
        return output + scale * vec

    handle = layers[layer].register_forward_hook(add)
    try:
        theirs, _ = _transformers_greedy(ref, folder, n)
    finally:
        handle.remove()
    assert ours.token_ids == theirs
    assert theirs != plain, "the vector must change the completion"


def test_sampled_path_logprobs_match_transformers(family_checkpoint):
    """Every step's full distribution on a diverse (sampled) path equals transformers'."""
    folder = family_checkpoint
    ours = sampled(folder, 12, logprobs=3)
    prompt = prompt_ids(folder)
    assert len(set(ours.token_ids)) > 3  # a path that actually moves
    ref = load_reference(folder)
    with torch.inference_mode():
        logits = ref(torch.tensor([[*prompt, *ours.token_ids[:-1]]])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1 :].float(), -1)
    assert (as_matrix(ours.requested_logprobs) - expected).abs().max() < TOL
    chosen = expected[torch.arange(12), torch.tensor(ours.token_ids)]
    assert (torch.tensor(shaped(folder, ours)["token_logprobs"]) - chosen).abs().max() < TOL


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gemma3"])
def test_cache_reuse_equals_full_forwards(family, checkpoint_root):
    """Decoding on the cache gives the tokens and logprobs of re-running everything each step."""
    folder = folder_of(family, checkpoint_root)
    model = loaded(folder).model
    prompt = prompt_ids(folder)
    n = 10  # gemma's window is 5: decoding runs well past it
    assert run(folder, n).token_ids == reference(model, prompt, n)
    ours = sampled(folder, n)
    assert ours.completion_tokens == n and ours.prompt_tokens == len(prompt)
    assert len(ours.requested_logprobs) == n
    expected = forced(model, prompt, ours.token_ids)
    assert (as_matrix(ours.requested_logprobs) - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------- interventions


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_patch_at_a_generated_position(family, checkpoint_root):
    folder = folder_of(family, checkpoint_root)
    model = loaded(folder).model
    prompt = prompt_ids(folder)
    t0 = len(prompt)
    vec = 8 * torch.randn(model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    edit = make_edit(1, "post_block", [0], [t0 + 1], vec)
    n = 8
    # The pass that computes position t0 + 1 feeds token 1 and predicts token 2.
    plain, patched = sampled(folder, n), sampled(folder, n, edits=[edit])
    assert patched.token_ids[:2] == plain.token_ids[:2]
    assert patched.requested_logprobs[:2] == plain.requested_logprobs[:2]  # bit for bit
    assert patched.requested_logprobs[2] != plain.requested_logprobs[2]
    assert patched.token_ids[2:] != plain.token_ids[2:]
    expected = forced(model, prompt, patched.token_ids, edits=[edit])
    assert (as_matrix(patched.requested_logprobs) - expected).abs().max() < 1e-5
    greedy = run(folder, n, edits=[edit])
    assert greedy.token_ids == reference(model, prompt, n, edits=[edit])
    assert greedy.token_ids[:2] == run(folder, 2).token_ids


def test_one_edit_spanning_prompt_and_generated_positions(checkpoint_root):
    folder = folder_of("llama", checkpoint_root)
    model = loaded(folder).model
    prompt = prompt_ids(folder)
    t0 = len(prompt)
    source = torch.randn(3, model.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(model.cfg.hidden_size) % 2).float()
    edits = [
        make_edit(0, "mlp_out", [0, 0, 0], [2, t0, t0 + 3], 4 * source, alpha=0.7),
        make_edit(1, "attn_head", [0], [t0 + 2], torch.ones(1, model.cfg.head_dim), heads=[1]),
        make_edit(2, "pre_attn", [0, 0], [t0 - 1, t0 + 4], source[:2], mask=mask),
    ]
    ours = sampled(folder, 7, edits=edits)
    expected = forced(model, prompt, ours.token_ids, edits=edits)
    assert (as_matrix(ours.requested_logprobs) - expected).abs().max() < 1e-5
    assert run(folder, 7, edits=edits).token_ids == reference(model, prompt, 7, edits=edits)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_steering(family, checkpoint_root):
    folder = folder_of(family, checkpoint_root)
    model = loaded(folder).model
    prompt = prompt_ids(folder)
    n = 8
    vec = torch.randn(model.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    plain = sampled(folder, n)
    off = sampled(folder, n, steer=[SteerVector(1, "post_attn", vec, scale=0.0)])
    assert off.token_ids == plain.token_ids
    assert off.requested_logprobs == plain.requested_logprobs
    steer = [
        SteerVector(1, "post_attn", vec, scale=3.0),
        SteerVector(0, "attn_head", torch.full((model.cfg.head_dim,), 0.5), scale=-2.0, head=2),
    ]
    on = sampled(folder, n, steer=steer)
    assert on.requested_logprobs[0] != plain.requested_logprobs[0]  # the prompt is steered too
    expected = forced(model, prompt, on.token_ids, steer=steer)
    assert (as_matrix(on.requested_logprobs) - expected).abs().max() < 1e-5
    assert run(folder, n, steer=steer).token_ids == reference(model, prompt, n, steer=steer)


# ---------------------------------------------------------------------------- logprobs


def test_top_logprobs_are_sorted_and_consistent(checkpoint_root):
    folder = folder_of("llama", checkpoint_root)
    tok = tokenizer(folder)
    out = run(folder, 6, logprobs=4)
    lp = shaped(folder, out)
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [tok.decode([i]) for i in out.token_ids]
    for token, value, top in zip(
        out.token_ids, lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert 4 <= len(top) <= 5
        # Greedy: the chosen token is the most likely one.
        assert values[0] == value
        assert tok.decode([token]) in top
        assert all(v <= 0 for v in values)
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][0] == 0
    assert run(folder, 6).logprobs is None


def test_echo_includes_the_prompt(checkpoint_root):
    folder = folder_of("gpt2", checkpoint_root)
    model = loaded(folder).model
    tok = tokenizer(folder)
    prompt = prompt_ids(folder)
    t0 = len(prompt)
    out = run(folder, 4, echo=True, logprobs=2)
    plain = run(folder, 4)
    assert out.token_ids == plain.token_ids
    assert out.text == tok.decode(prompt) + plain.text
    assert out.completion_text == plain.text
    lp = shaped(folder, out)
    assert len(lp["tokens"]) == t0 + 4
    assert lp["tokens"][:t0] == [tok.decode([i]) for i in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)
    for i in range(1, t0):
        assert abs(lp["token_logprobs"][i] - float(full[i - 1, prompt[i]])) < 1e-5
        assert len(lp["top_logprobs"][i]) in (2, 3)
    offsets = lp["text_offset"]
    for i in range(t0):  # an ASCII prompt: every token sits at its offset
        assert out.text[offsets[i] :].startswith(lp["tokens"][i])
    assert offsets[t0] == len(tok.decode(prompt))
    # Scoring only: echo with max_tokens 0 returns the prompt's logprobs.
    scored = run(folder, 0, echo=True, logprobs=0)
    assert scored.token_ids == [] and scored.finish_reason == "length"
    assert scored.text == tok.decode(prompt)
    assert shaped(folder, scored)["token_logprobs"] == lp["token_logprobs"][:t0]


# ---------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(checkpoint_root):
    folder = folder_of("llama", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    prompt = prompt_ids(folder)

    def sample(seed: int | None, **kwargs) -> list[int]:
        req = GenerationRequest(prompt, max_tokens=8, temperature=1.5, seed=seed, **kwargs)
        return generate(model, tok, req).token_ids

    assert sample(123) == sample(123)
    assert len({tuple(sample(s)) for s in range(5)}) > 1
    assert sample(7, top_p=1e-9) == run(folder, 8).token_ids
    assert len(sample(None)) == 8


def test_sampler_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, 1.0, 1.0, gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert (freq - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03
    nucleus = {sample(logits, 1.0, 0.7, gen) for _ in range(300)}
    assert nucleus == {0, 1}  # 0.5 < 0.7 <= 0.8: the two likeliest tokens
    assert {sample(logits, 1.0, 0.45, gen) for _ in range(100)} == {0}
    assert {sample(logits, 1.0, 0.9, gen) for _ in range(300)} == {0, 1, 2}
    hot = torch.tensor([sample(logits, 0.25, 1.0, gen) for _ in range(1000)])
    assert (hot == 0).float().mean() > 0.75  # low temperature sharpens
    assert sample(torch.tensor([1.0, 3.0, 3.0]), 0, 1.0, gen) == 1


# ---------------------------------------------------------------------------- stopping


def _readable(s: str) -> bool:
    return bool(s.strip()) and s.isascii() and s.isprintable()


def test_stop_strings_and_stop_tokens(checkpoint_root):
    folder = folder_of("mistral", checkpoint_root)
    tok = tokenizer(folder)
    plain = run(folder, 16, temperature=1.0, seed=2, logprobs=1)
    reported = shaped(folder, plain)
    text, ids, offsets = plain.text, plain.token_ids, reported["text_offset"]
    assert plain.finish_reason == "length" and len(ids) == 16

    def check(stop: str) -> None:
        cut = text.find(stop)
        assert 0 < cut < len(text) - len(stop)
        out = run(folder, 16, temperature=1.0, seed=2, logprobs=1, stop=["\x00never", stop])
        assert out.finish_reason == "stop"
        assert out.text == out.completion_text == text[:cut]
        kept = sum(1 for o in offsets if o < cut)
        assert 0 < kept < len(ids)
        assert out.token_ids == ids[:kept]
        assert shaped(folder, out)["tokens"] == reported["tokens"][:kept]
        assert shaped(folder, out)["text_offset"] == offsets[:kept]
        assert kept <= out.completion_tokens < len(ids)

    # A stop string that is one token's text, and one across a token boundary.
    j = next(
        j
        for j in range(2, len(ids))
        if _readable(tok.decode([ids[j]])) and text.find(tok.decode([ids[j]])) == offsets[j]
    )
    check(tok.decode([ids[j]]))  # cuts exactly at token j, which is left out
    b = next(
        offsets[j]
        for j in range(2, len(ids) - 1)
        if offsets[j - 1] < offsets[j] < offsets[j + 1]
        and _readable(text[offsets[j] - 1 : offsets[j] + 1])
    )
    check(text[b - 1 : b + 1])
    # A stop token ends generation and is not returned.
    first = ids.index(ids[5])
    out = run(folder, 16, temperature=1.0, seed=2, stop_token_ids=[ids[5]])
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[:first]
    assert out.completion_tokens == first + 1
    assert out.text == tok.decode(ids[:first])


def test_max_tokens_zero_returns_nothing(checkpoint_root):
    folder = folder_of("llama", checkpoint_root)
    out = run(folder, 0, logprob_token_ids=[3])
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    assert out.completion_tokens == 0 and out.requested_logprobs == []


BAD = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 250}, "max_tokens"),  # prompt + 250 > 256 positions
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"seed": "7"}, "seed"),
    ({"prompt_ids": []}, "prompt"),
    ({"prompt_ids": [5, 320]}, "prompt"),
    ({"prompt_ids": [5] * 300}, "prompt"),
    ({"logprob_token_ids": [-1]}, "logprob_token_ids"),
    ({"stop_token_ids": [1000]}, "stop_token_ids"),
    ({"stop": [""]}, "stop"),
    ({"edits": [make_edit(3, "post_block", [0], [1], torch.zeros(64))]}, "patch"),
    ({"edits": [make_edit(0, "post_block", [1], [1], torch.zeros(64))]}, "patch"),
    ({"edits": [make_edit(0, "post_block", [0], [1], torch.zeros(32))]}, "patch"),
    ({"steer": [SteerVector(0, "post_block", torch.zeros(63))]}, "steer"),
    ({"steer": [SteerVector(-1, "post_block", torch.zeros(64))]}, "steer"),
    ({"steer": [SteerVector(0, "resid", torch.zeros(64))]}, "steer"),
    ({"steer": [SteerVector(0, "attn_head", torch.zeros(16))]}, "steer"),
    ({"steer": [SteerVector(0, "post_block", torch.zeros(64), scale=float("inf"))]}, "steer"),
]


@pytest.mark.parametrize(("change", "param"), BAD)
def test_bad_requests_name_their_parameter(change, param, checkpoint_root):
    folder = folder_of("llama", checkpoint_root)
    fields = {"prompt_ids": prompt_ids(folder), "max_tokens": 4, **change}
    with pytest.raises(InvalidArgument) as err:
        generate(loaded(folder).model, tokenizer(folder), GenerationRequest(**fields))
    assert err.value.param == param
    assert err.value.message


# ---------------------------------------------------------------------------- chat


def test_chat_template(checkpoint_root):
    folder = folder_of("llama", checkpoint_root)
    tok = Tokenizer.from_folder(folder)  # a private copy: its template is replaced below
    tok.hf.chat_template = None
    assert not tok.has_chat_template
    with pytest.raises(InvalidArgument) as err:
        apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    assert err.value.param == "messages"
    tok.hf.chat_template = (
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The capital of France?"},
    ]
    ids = apply_chat_template(tok, messages)
    text = "<|bos|>system: Be brief.\n<|bos|>user: The capital of France?\nassistant:"
    assert ids == tok.encode(text, add_special_tokens=False).ids
    assert all(type(i) is int for i in ids)
    out = generate(loaded(folder).model, tok, GenerationRequest(ids, max_tokens=3, temperature=0))
    assert len(out.token_ids) == 3
    for bad in ([], "hi", [{"content": "no role"}]):
        with pytest.raises(InvalidArgument) as err:
            apply_chat_template(tok, bad)
        assert err.value.param == "messages"
