"""Text generation with interventions: the engine behind ``/v1/completions`` (docs/api.md §2).

:func:`generate` prefills the prompt once (keeping its keys and values), then
decodes one token per pass on top of that cache; the prompt is never
recomputed. Every pass carries a :class:`~patchserve.models.hooks.HookContext`:

* **patches** (``GenerationRequest.edits``) address *absolute* positions, so an
  edit at a position ``>= len(prompt)`` applies on the decoding pass that
  computes that position — the pass that feeds generated token
  ``position - len(prompt)`` and predicts the next one;
* **steering** (``GenerationRequest.steer``) adds ``scale * vector`` at every
  position a pass computes, prompt and generated tokens alike.

Sampling follows the OpenAI semantics: ``temperature == 0`` is greedy,
otherwise ``softmax(logits / temperature)`` restricted to the nucleus
``top_p``, drawn with a CPU ``torch.Generator`` seeded by ``seed`` (the same
seed gives the same tokens). Reported logprobs are of the model's own
distribution (``log_softmax`` of the raw logits, before temperature).

Stop strings truncate the text before the earliest match (``finish_reason
"stop"``); the returned tokens are those whose text starts before the cut. A
stop token id (e.g. EOS) ends generation and is left out of the tokens and
the text. ``completion_tokens`` counts every token the model produced,
including a stop token and tokens cut by a stop string.

:func:`apply_chat_template` turns chat messages into prompt ids with the
tokenizer's chat template (``/v1/chat/completions``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.models.hooks import HOOKS, HookContext, SiteEdit, make_edit
from patchserve.models.transformer import KVCache, Transformer
from patchserve.text.tokenizer import Tokenizer

MAX_LOGPROBS = 20
PROMPT_LOGPROB_CHUNK = 512  # prompt positions unembedded at once for echo logprobs
DETOKENIZE_CONTEXT = 6  # tokens of left context when detokenizing incrementally


@dataclass
class SteerVector:
    """Additive steering: ``h += scale * vector`` at every position (prompt and generated).

    ``head`` selects the query head for ``attn_head`` (``vector`` is then
    ``head_dim`` wide); every other hook takes a ``hidden_size`` vector.
    """

    layer: int
    hook: str
    vector: torch.Tensor  # [width]
    scale: float = 1.0
    head: int | None = None


@dataclass
class GenerationRequest:
    """One completion request, already tokenized (see the module docstring for semantics)."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings
    stop_token_ids: Sequence[int] = ()  # e.g. EOS: ends generation, not included
    logprobs: int | None = None  # top-k logprobs per token (OpenAI legacy completions)
    logprob_token_ids: Sequence[int] = ()  # exact logprobs of these ids at each generated step
    echo: bool = False  # prepend the prompt (text, and tokens/logprobs when logprobs is set)
    edits: Sequence[SiteEdit] = ()  # absolute positions; rows are 0
    steer: Sequence[SteerVector] = ()


@dataclass
class ReportedTokens:
    """Tokens with their steps (None: the first prompt token) and offsets into the text."""

    token_ids: list[int]
    steps: list[TokenStep | None]
    text_offset: list[int]


@dataclass
class GenerationResult:
    """What one :func:`generate` call produced.

    ``text`` is the OpenAI ``choices[i].text``: the prompt text followed by the
    completion when ``echo`` is set, else the completion alone
    (``completion_text``). ``logprobs`` (when ``logprobs`` was asked for)
    reports every token of ``text`` with the distribution it was drawn from,
    the prompt tokens first when ``echo`` is set (the first prompt token has
    no step). ``requested_logprobs[i]`` maps each id of ``logprob_token_ids``
    to its logprob at generated token ``i``. The server shapes these for the
    wire (``patchserve.wire.completions``).
    """

    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: ReportedTokens | None
    requested_logprobs: list[dict[int, float]] | None
    prompt_tokens: int
    completion_tokens: int
    completion_text: str = ""


@dataclass
class TokenStep:
    """The distribution one token was drawn from, as reported."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    requested: dict[int, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_ids(ids: Any, vocab: int, param: str) -> None:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise InvalidArgument(f"{param} must be a list of token ids", param)
    for i in ids:
        if not _is_int(i):
            raise InvalidArgument(f"{param} must hold integer token ids, got {i!r}", param)
        if not 0 <= i < vocab:
            raise InvalidArgument(
                f"token id {i} in {param} is outside the vocabulary [0, {vocab})", param
            )


def validate_request(model: Transformer, request: GenerationRequest) -> None:
    """Raise :class:`InvalidArgument` (naming the field) for anything :func:`generate` rejects."""
    cfg = model.cfg
    vocab = cfg.vocab_size
    _check_ids(request.prompt_ids, vocab, "prompt")
    if len(request.prompt_ids) == 0:
        raise InvalidArgument("the prompt is empty: it must hold at least one token", "prompt")
    m = request.max_tokens
    if not _is_int(m) or m < 0:
        raise InvalidArgument(f"max_tokens must be an integer >= 0, got {m!r}", "max_tokens")
    context = cfg.max_position_embeddings
    t = len(request.prompt_ids)
    if t > context:
        raise InvalidArgument(
            f"the prompt has {t} tokens, more than the model's context of {context}", "prompt"
        )
    if t + m > context:
        raise InvalidArgument(
            f"the prompt ({t} tokens) plus max_tokens ({m}) exceeds the model's context of "
            f"{context} tokens; lower max_tokens to at most {context - t}",
            "max_tokens",
        )
    temperature = request.temperature
    if not _is_number(temperature) or temperature < 0:
        raise InvalidArgument(
            f"temperature must be a finite number >= 0, got {temperature!r}", "temperature"
        )
    top_p = request.top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    if request.seed is not None and not _is_int(request.seed):
        raise InvalidArgument(f"seed must be an integer, got {request.seed!r}", "seed")
    k = request.logprobs
    if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
        raise InvalidArgument(
            f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {k!r}", "logprobs"
        )
    _check_ids(request.logprob_token_ids, vocab, "logprob_token_ids")
    _check_ids(request.stop_token_ids, vocab, "stop_token_ids")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if not isinstance(stop, Sequence):
        raise InvalidArgument("stop must be a string or a list of strings", "stop")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidArgument(f"stop strings must be non-empty strings, got {s!r}", "stop")
    if not isinstance(request.echo, bool):
        raise InvalidArgument(f"echo must be a boolean, got {request.echo!r}", "echo")
    for edit in request.edits:
        _check_edit(model, edit)
    for steer in request.steer:
        _check_steer(model, steer)


def _check_layer(model: Transformer, layer: Any, param: str) -> None:
    n = model.cfg.num_layers
    if not _is_int(layer) or not 0 <= layer < n:
        raise InvalidArgument(f"layer {layer!r} is out of range: the model has {n} layers", param)


def _check_edit(model: Transformer, edit: SiteEdit) -> None:
    cfg = model.cfg
    _check_layer(model, edit.layer, "patch")
    if bool((edit.rows != 0).any()):
        raise InvalidArgument("generation runs one sequence: patch rows must be 0", "patch")
    if bool((edit.positions < 0).any()):
        raise InvalidArgument("patch positions must be >= 0", "patch")
    width = cfg.hook_width(edit.hook)
    if edit.source.dim() != 2 or edit.source.shape[1] != width:
        raise InvalidArgument(
            f"a patch source at {edit.hook} must be {width} wide, got shape "
            f"{list(edit.source.shape)}",
            "patch",
        )
    if edit.heads is not None and bool(((edit.heads < 0) | (edit.heads >= cfg.num_heads)).any()):
        raise InvalidArgument(f"patch heads must be in 0..{cfg.num_heads - 1}", "patch")


def _check_steer(model: Transformer, steer: SteerVector) -> None:
    cfg = model.cfg
    _check_layer(model, steer.layer, "steer")
    if steer.hook not in HOOKS:
        raise InvalidArgument(
            f"unknown steering hook {steer.hook!r}; expected one of {', '.join(HOOKS)}", "steer"
        )
    width = cfg.hook_width(steer.hook)
    if not isinstance(steer.vector, torch.Tensor) or tuple(steer.vector.shape) != (width,):
        shape = list(steer.vector.shape) if isinstance(steer.vector, torch.Tensor) else None
        raise InvalidArgument(
            f"a steering vector at {steer.hook} must be {width} wide, got shape {shape}", "steer"
        )
    if not _is_number(steer.scale):
        raise InvalidArgument(
            f"steering scale must be a finite number, got {steer.scale!r}", "steer"
        )
    if steer.hook == "attn_head":
        head = steer.head
        if head is None or not _is_int(head) or not 0 <= head < cfg.num_heads:
            raise InvalidArgument(
                f"attn_head steering needs a head in 0..{cfg.num_heads - 1}, got {steer.head!r}",
                "steer",
            )
    elif steer.head is not None:
        raise InvalidArgument("a steering head is given only for the attn_head hook", "steer")


# ---------------------------------------------------------------------------- interventions


def _select(edit: SiteEdit, index: list[int]) -> SiteEdit:
    idx = torch.tensor(index, dtype=torch.long, device=edit.rows.device)
    return dataclasses.replace(
        edit,
        rows=edit.rows[idx],
        positions=edit.positions[idx],
        source=edit.source[idx],
        alpha=edit.alpha[idx],
        mask=None if edit.mask is None else edit.mask[idx],
        heads=None if edit.heads is None else edit.heads[idx],
    )


def _to_device(edit: SiteEdit, device: torch.device) -> SiteEdit:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return dataclasses.replace(
        edit,
        rows=edit.rows.to(device),
        positions=edit.positions.to(device),
        source=edit.source.to(device),
        alpha=edit.alpha.to(device),
        mask=move(edit.mask),
        heads=move(edit.heads),
    )


class _Interventions:
    """The edits and steering of every pass, split by the positions each pass computes."""

    def __init__(self, request: GenerationRequest, prompt_len: int, device: torch.device) -> None:
        self.prompt_len = prompt_len
        self.device = device
        self.prompt_edits: list[SiteEdit] = []
        self.step_edits: dict[int, list[SiteEdit]] = {}
        for edit in request.edits:
            edit = _to_device(edit, device)
            positions = edit.positions.tolist()
            inside = [i for i, p in enumerate(positions) if p < prompt_len]
            if inside:
                whole = len(inside) == len(positions)
                self.prompt_edits.append(edit if whole else _select(edit, inside))
            later: dict[int, list[int]] = {}
            for i, p in enumerate(positions):
                if p >= prompt_len:
                    later.setdefault(p, []).append(i)
            for p, index in later.items():
                self.step_edits.setdefault(p, []).append(_select(edit, index))
        self.steer = [
            (s, s.vector.to(device=device, dtype=torch.float32))
            for s in request.steer
            if s.scale != 0  # an exact no-op
        ]

    def context(self, start: int, count: int) -> HookContext:
        """The hooks of the pass computing positions ``start .. start + count - 1``."""
        edits = list(self.prompt_edits if start == 0 else self.step_edits.get(start, ()))
        positions = torch.arange(start, start + count, device=self.device)
        rows = torch.zeros(count, dtype=torch.long, device=self.device)
        for steer, vector in self.steer:
            heads = None if steer.head is None else [steer.head] * count
            edits.append(
                make_edit(
                    steer.layer,
                    steer.hook,
                    rows,
                    positions,
                    vector,
                    alpha=float(steer.scale),
                    heads=heads,
                    kind="add",
                )
            )
        return HookContext.build(edits)


# ---------------------------------------------------------------------------- cache


class _KVBuffer:
    """Keys and values preallocated for the whole generation; steps write in place."""

    def __init__(self, kv: KVCache, total: int) -> None:
        self.length = kv.length
        self.keys = [self._alloc(k, total) for k in kv.keys]
        self.values = [self._alloc(v, total) for v in kv.values]

    def _alloc(self, t: torch.Tensor | None, total: int) -> torch.Tensor | None:
        if t is None:
            return None
        buf = t.new_empty(t.shape[0], t.shape[1], max(total, t.shape[2]), t.shape[3])
        buf[:, :, : t.shape[2]] = t
        return buf

    def view(self) -> KVCache:
        n = self.length
        return KVCache(
            [None if k is None else k[:, :, :n] for k in self.keys],
            [None if v is None else v[:, :, :n] for v in self.values],
        )

    def append(self, kv: KVCache) -> None:
        n, m = self.length, kv.length
        for bufs, news in ((self.keys, kv.keys), (self.values, kv.values)):
            for buf, new in zip(bufs, news, strict=True):
                if buf is not None and new is not None:
                    buf[:, :, n : n + m] = new
        self.length = n + m


# ---------------------------------------------------------------------------- text


class _Detokenizer:
    """Incremental detokenization with a few tokens of left context (as TGI/vLLM do).

    A token's text is released once it decodes to complete characters (byte
    level BPE may split a character over several tokens); ``push`` returns the
    character offset at which the token's text starts in ``text``.
    """

    def __init__(self, tokenizer: Tokenizer, ids: list[int], start: int) -> None:
        self.tokenizer = tokenizer
        self.ids = list(ids[:start])
        self.prefix = max(0, start - DETOKENIZE_CONTEXT)
        self.read = start
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _release(self, force: bool) -> None:
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and (force or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token: int) -> int:
        offset = len(self.text)
        self.ids.append(token)
        self._release(force=False)
        return offset

    def flush(self) -> None:
        if self.read < len(self.ids):
            self._release(force=True)


def _find_stop(text: str, stops: Sequence[str], start: int, floor: int) -> int | None:
    """Index (``>= floor``) of the earliest stop string in ``text`` that ends after ``start``."""
    best = None
    for s in stops:
        i = text.find(s, max(floor, start - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


# ---------------------------------------------------------------------------- sampling


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One token id from ``logits`` ``[V]`` (CPU float32)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the strictly likelier tokens
        keep = before < top_p
        keep[0] = True
        sorted_p, order = sorted_p[keep], order[keep]
    else:
        sorted_p, order = probs, None
    cdf = torch.cumsum(sorted_p, 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
    return int(order[i]) if order is not None else i


def _step(
    logits: torch.Tensor,
    token: int,
    k: int | None,
    requested: Sequence[int],
) -> TokenStep:
    """Report the model's distribution ``log_softmax(logits)`` at one generated token."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    step = TokenStep(token=token, logprob=float(lp[token]))
    if k:
        values, ids = torch.topk(lp, k)
        step.top = list(zip(ids.tolist(), values.tolist(), strict=True))
    if requested:
        chosen = lp[torch.tensor(list(requested), dtype=torch.long)].tolist()
        step.requested = dict(zip(requested, chosen, strict=True))
    return step


def _prompt_steps(
    model: Transformer, hidden: torch.Tensor, prompt: list[int], k: int
) -> list[TokenStep | None]:
    """Logprob of each prompt token given its prefix (``None`` for the first)."""
    steps: list[TokenStep | None] = [None]
    t = len(prompt)
    for a in range(0, t - 1, PROMPT_LOGPROB_CHUNK):
        b = min(t - 1, a + PROMPT_LOGPROB_CHUNK)
        logits = model.unembed(hidden[0, a:b]).float().cpu()
        for j in range(b - a):
            steps.append(_step(logits[j], prompt[a + j + 1], k, ()))
    return steps


# ---------------------------------------------------------------------------- generate


@torch.inference_mode()
def generate(
    model: Transformer, tokenizer: Tokenizer, request: GenerationRequest
) -> GenerationResult:
    """Generate a completion of ``request.prompt_ids`` with the request's interventions."""
    validate_request(model, request)
    prompt = [int(i) for i in request.prompt_ids]
    t0 = len(prompt)
    max_tokens = request.max_tokens
    k = request.logprobs
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    stop_ids = {int(i) for i in request.stop_token_ids}
    requested = [int(i) for i in request.logprob_token_ids]
    echo_logprobs = request.echo and k is not None
    device = model.device
    hooks = _Interventions(request, t0, device)
    generator = torch.Generator()
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed % 2**64)

    prompt_steps: list[TokenStep | None] = []
    steps: list[TokenStep] = []
    generated: list[int] = []
    produced = 0
    finish: Literal["stop", "length"] = "length"
    detok = _Detokenizer(tokenizer, prompt, 0 if request.echo else t0)
    prompt_offsets = [detok.push(i) for i in prompt] if request.echo else []
    prompt_text = detok.text
    completion_offsets: list[int] = []
    cut: int | None = None

    if max_tokens > 0 or echo_logprobs:
        out = model(
            torch.tensor([prompt], device=device),
            hooks=hooks.context(0, t0),
            logits_at="last" if max_tokens > 0 else None,
            return_kv=max_tokens > 0,
        )
        if echo_logprobs:
            assert k is not None
            prompt_steps = _prompt_steps(model, out.hidden, prompt, k)
        cache = _KVBuffer(out.kv, t0 + max_tokens) if out.kv is not None else None
        while max_tokens > 0:
            assert out.logits is not None and cache is not None
            logits = out.logits[0, -1].float().cpu()
            token = _sample(logits, float(request.temperature), float(request.top_p), generator)
            produced += 1
            if token in stop_ids:
                finish = "stop"
                break
            steps.append(_step(logits, token, k, requested))
            generated.append(token)
            before = len(detok.text)
            completion_offsets.append(detok.push(token))
            if stops:
                cut = _find_stop(detok.text, stops, before, len(prompt_text))
                if cut is not None:
                    finish = "stop"
                    break
            if len(generated) == max_tokens:
                break
            position = t0 + len(generated) - 1
            out = model(
                torch.tensor([[token]], device=device),
                cache=cache.view(),
                hooks=hooks.context(position, 1),
                logits_at="last",
                return_kv=True,
            )
            assert out.kv is not None
            cache.append(out.kv)

    if cut is None:
        before = len(detok.text)
        detok.flush()
        if stops and len(detok.text) > before:
            cut = _find_stop(detok.text, stops, before, len(prompt_text))
            if cut is not None:
                finish = "stop"
    if cut is not None:
        kept = sum(1 for offset in completion_offsets if offset < cut)
        del generated[kept:], steps[kept:], completion_offsets[kept:]
    # With echo the text (and every offset) covers the prompt, then the completion.
    text = detok.text if cut is None else detok.text[:cut]
    completion_text = text[len(prompt_text) :]

    logprobs = None
    if k is not None:
        if request.echo:
            logprobs = ReportedTokens(
                [*prompt, *generated],
                [*prompt_steps, *steps],
                [*prompt_offsets, *completion_offsets],
            )
        else:
            logprobs = ReportedTokens(list(generated), [*steps], completion_offsets)
    return GenerationResult(
        token_ids=generated,
        text=text,
        finish_reason=finish,
        logprobs=logprobs,
        requested_logprobs=[s.requested for s in steps] if requested else None,
        prompt_tokens=t0,
        completion_tokens=produced,
        completion_text=completion_text,
    )


# ---------------------------------------------------------------------------- chat


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt ids of chat ``messages`` through the tokenizer's template, ready for the reply."""
    if not tokenizer.has_chat_template:
        raise InvalidArgument("this model's tokenizer has no chat template", "messages")
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidArgument("messages must be a non-empty list of message objects", "messages")
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidArgument(
                f"each message must be an object with a string 'role', got {m!r}", "messages"
            )
    try:
        out: Any = tokenizer.hf.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True
        )
    except Exception as exc:  # the template runs user content through jinja
        raise InvalidArgument(
            f"the chat template failed on these messages: {exc}", "messages"
        ) from exc
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]
