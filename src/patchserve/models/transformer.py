"""The hooked decoder-only transformer and its named entry points.

* :meth:`Transformer.forward` — the readable full pass: logits of every token
  of padded rows of token ids (what ``model(ids)`` calls);
* :meth:`Transformer.prefill` — a full pass that also keeps its key/value
  cache (the sweep's corrupt run, the prompt of a generation);
* :meth:`Transformer.extend` — tokens continuing a cache (a decoding step);
* :meth:`Transformer.resume` — the sweep's pass: :class:`ResumeRows` of
  residual stream entering block ``l`` on a shared (batch-1) corrupt cache,
  with each row's own prefix length, reusing unchanged attention, and the
  final block run for the rows' last tokens only; last-token logits.

:meth:`Transformer.run_blocks` is the stage they share (blocks ``l..L-1`` on
rows, residual out). Interventions and captures travel in a
:class:`HookContext`. The pass's state (cache, reuse, masks, rope tables) is
``models/state.py``; where its tokens sit, ``models/layout.py``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from patchserve.cancel import raise_if_cancelled
from patchserve.models import placement as placing
from patchserve.models.block import DecoderBlock
from patchserve.models.config import ModelConfig
from patchserve.models.decode_kernels import DecodeLinear, decoding_kernels
from patchserve.models.hooks import HOOKS, HookContext
from patchserve.models.invariance import Linear, batch_invariant, plain_unembedding
from patchserve.models.layers import Rotary, make_norm
from patchserve.models.layout import Layout, ResumeRows
from patchserve.models.placement import Placement
from patchserve.models.state import KVBlock, KVCache, PassState, Reuse


@dataclass
class CachedPass:
    """What :meth:`Transformer.prefill` and :meth:`Transformer.extend` return."""

    logits: torch.Tensor  # [batch, vocab] at each row's last token
    cache: KVCache  # keys/values of the tokens this pass computed
    captured: dict[tuple[int, str], torch.Tensor]
    hidden: torch.Tensor  # [batch, tokens, d] leaving the last block, before the final norm


class Transformer(nn.Module):
    """A decoder-only LM built from a :class:`ModelConfig`; weights come from a family loader."""

    runtime = "native"  # which runtime serves the model ("transformers": models/generic/)
    offered_hooks: tuple[str, ...] = HOOKS  # the hooks this runtime provides exactly

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        e = cfg.embed_dim or d  # the token embedding's (and lm_head's) width
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e)
        # OPT-350m: the embedding is projected into the residual width and back out of it.
        self.project_in = Linear(e, d, bias=False) if e != d else None
        self.project_out = Linear(d, e, bias=False) if e != d else None
        if self.project_out is not None:
            self.project_out.packed_always = True  # part of the unembedding: one kernel
        rows = cfg.max_position_embeddings + cfg.position_offset
        self.embed_positions = nn.Embedding(rows, d) if cfg.learned_positions else None
        self.embed_norm = make_norm(cfg.norm_kind, d, cfg.norm_eps) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.num_layers))
        self.final_norm = (
            make_norm(cfg.norm_kind, d, cfg.norm_eps) if cfg.final_norm else nn.Identity()
        )
        self.lm_head = DecodeLinear(e, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.lm_head.packed_always = True  # every pass's logits from one kernel
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        ropes = sorted({r for r in cfg.rope if r is not None}, key=repr)
        self._rotaries = {r: Rotary(r) for r in ropes}
        self.rotary_modules = nn.ModuleList(self._rotaries.values())  # registered as submodules
        self.device_map: Placement | None = None  # None: every layer on ``device``

    @property
    def placement(self) -> Placement:
        """The stages the layers run in (one stage unless loaded with a device map)."""
        if self.device_map is not None:
            return self.device_map
        return Placement.single(self.device, self.cfg.num_layers)

    @property
    def device(self) -> torch.device:
        """The input device (the embedding's): where token ids go."""
        return self.embed_tokens.weight.device

    @property
    def input_device(self) -> torch.device:
        return self.device

    @property
    def output_device(self) -> torch.device:
        """Where the final norm and ``lm_head`` live, and logits come out."""
        return self.lm_head.weight.device

    def device_of(self, layer: int) -> torch.device:
        """The device of block ``layer`` (``num_layers``: the output device)."""
        if layer >= self.cfg.num_layers:
            return self.output_device
        return self.placement.device_of(layer)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0 (before its ``pre_attn`` hook), ``hidden_size``
        wide (a narrower embedding goes through ``project_in``)."""
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.cfg.embed_scale is not None:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + self.cfg.position_offset)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a residual stream leaving the last block."""
        hidden = hidden.to(self.output_device)
        hidden = self.final_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        logits = self.lm_head(hidden)
        if self.cfg.logit_scale is not None:
            logits = logits * self.cfg.logit_scale
        cap = self.cfg.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        hooks: HookContext | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` of right-padded rows ``input_ids`` ``[batch, tokens]``.

        ``lengths``: real tokens per row (all by default). Captures land in ``hooks.captured``.
        """
        layout = self._padded_layout(input_ids, lengths, None)
        state = self._state(layout, hooks, None, keep_cache=False)
        x, _ = self._run(self.embed(input_ids, layout.positions), state, 0, self.cfg.num_layers)
        return self.unembed(x)

    def prefill(self, input_ids: torch.Tensor, hooks: HookContext | None = None) -> CachedPass:
        """A full pass over ``input_ids`` ``[batch, tokens]`` that keeps its key/value cache."""
        return self._cached_pass(input_ids, None, hooks)

    def extend(
        self, input_ids: torch.Tensor, cache: KVCache, hooks: HookContext | None = None
    ) -> CachedPass:
        """``input_ids`` ``[batch, tokens]`` continuing the tokens of ``cache`` (a decoding step).

        The returned cache holds the new tokens only (see :meth:`KVCache.extend`).
        """
        return self._cached_pass(input_ids, cache, hooks)

    def run_on_block(
        self,
        input_ids: torch.Tensor,
        offsets: torch.Tensor,
        lengths: torch.Tensor,
        block: KVBlock,
        hooks: HookContext | None = None,
    ) -> CachedPass:
        """Right-padded rows ``input_ids`` ``[rows, t]`` at positions ``offsets[r] ..`` (real for
        ``lengths[r]`` tokens) on a preallocated :class:`KVBlock` holding each row's earlier
        tokens: keys written in place (a batched generation's prefill and decoding steps).
        The returned ``cache`` is empty (the keys live in ``block``)."""
        t = input_ids.shape[1]
        block.end = int(offsets.max()) + t
        layout = Layout(offsets, lengths, t, False)
        state = PassState(
            hooks if hooks is not None else HookContext(),
            layout,
            None,
            self._rotaries,
            self.dtype,
            False,
            block,
        )
        with decoding_kernels():
            x, last = self._run(
                self.embed(input_ids, layout.positions), state, 0, self.cfg.num_layers
            )
            with plain_unembedding():
                logits = self.unembed(last.last_tokens(x))
        return CachedPass(logits, KVCache([], []), state.hooks.captured, x)

    def resume(
        self,
        rows: ResumeRows,
        start_layer: int,
        cache: KVCache | None = None,
        reuse: Reuse | None = None,
        hooks: HookContext | None = None,
        invariant: bool = False,
    ) -> torch.Tensor:
        """Last-token logits ``[rows, vocab]`` of ``rows`` entering block ``start_layer``.

        Three stages: blocks ``start_layer..L-2`` on every token; the final
        block for each row's last token only (keys and values still cover every
        token; run in full instead when a site of it is captured); unembedding.
        ``reuse``: the unchanged attention of block ``start_layer``. ``invariant``:
        a batch-invariant pass (each row's logits bit for bit the same whatever rows share
        the batch, see :mod:`~patchserve.models.invariance`); the rows must then end together.
        """
        with batch_invariant() if invariant else nullcontext():
            return self._resume(rows, start_layer, cache, reuse, hooks, invariant)

    def _resume(
        self,
        rows: ResumeRows,
        start_layer: int,
        cache: KVCache | None,
        reuse: Reuse | None,
        hooks: HookContext | None,
        absolute: bool,
    ) -> torch.Tensor:
        hooks = hooks if hooks is not None else HookContext()
        final = self.cfg.num_layers - 1
        narrow = start_layer <= final and not hooks.captures_layer(final)
        stop = final if narrow else final + 1
        layout = self._rows_layout(rows, start_layer, cache, absolute)
        state = self._state(layout, hooks, cache, False)
        x, state = self._run(rows.hidden, state, start_layer, stop, reuse)
        if narrow:
            block = self.blocks[final]
            assert isinstance(block, DecoderBlock)
            if final == start_layer or final in self._stage_starts():
                x, state = self._enter(x, state, final)
            own = reuse.to(x.device) if reuse is not None and start_layer == final else None
            last = block.forward_last(x, state, own)
        else:
            last = state.last_tokens(x)
        return self.unembed(last)

    def run_blocks(
        self,
        rows: ResumeRows,
        start_layer: int,
        cache: KVCache | None = None,
        reuse: Reuse | None = None,
        hooks: HookContext | None = None,
        invariant: bool = False,
    ) -> torch.Tensor:
        """The residual stream of every token of ``rows`` after blocks ``start_layer..L-1``
        (``invariant``: batch-invariant, as :meth:`resume`)."""
        with batch_invariant() if invariant else nullcontext():
            layout = self._rows_layout(rows, start_layer, cache, invariant)
            state = self._state(layout, hooks, cache, keep_cache=False)
            return self._run(rows.hidden, state, start_layer, self.cfg.num_layers, reuse)[0]

    # -- the stages the entry points share -------------------------------------------

    def _cached_pass(
        self, input_ids: torch.Tensor, cache: KVCache | None, hooks: HookContext | None
    ) -> CachedPass:
        layout = self._padded_layout(input_ids, None, cache)
        state = self._state(layout, hooks, cache, keep_cache=True)
        x, last = self._run(self.embed(input_ids, layout.positions), state, 0, self.cfg.num_layers)
        logits = self.unembed(last.last_tokens(x))
        return CachedPass(logits, state.cache(self.cfg.num_layers), state.hooks.captured, x)

    def _padded_layout(
        self, input_ids: torch.Tensor, lengths: torch.Tensor | None, cache: KVCache | None
    ) -> Layout:
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be [batch, tokens]")
        b, t = input_ids.shape
        device = input_ids.device
        if cache is not None and cache.batch not in (0, 1, b):
            raise ValueError("the cache must have batch 1 or one row per input row")
        start = cache.length if cache is not None else 0
        offsets = torch.full((b,), start, dtype=torch.long, device=device)
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=device)
        prefix = offsets if cache is not None else None
        return Layout(offsets, lengths.to(device), t, False, prefix, start)

    def _rows_layout(
        self, rows: ResumeRows, start_layer: int, cache: KVCache | None, absolute: bool
    ) -> Layout:
        if not 0 <= start_layer <= self.cfg.num_layers:
            raise ValueError(f"start_layer must be in 0..{self.cfg.num_layers}")
        if cache is not None and cache.batch not in (0, 1, rows.lengths.shape[0]):
            raise ValueError("the cache must have batch 1 or one row per resumed row")
        return rows.layout(cache.length if cache is not None else None, absolute)

    def _state(
        self, layout: Layout, hooks: HookContext | None, cache: KVCache | None, keep_cache: bool
    ) -> PassState:
        hooks = hooks if hooks is not None else HookContext()
        return PassState(hooks, layout, cache, self._rotaries, self.dtype, keep_cache)

    def _run(
        self,
        x: torch.Tensor,
        state: PassState,
        start: int,
        stop: int,
        reuse: Reuse | None = None,
    ) -> tuple[torch.Tensor, PassState]:
        """Blocks ``start..stop-1`` on the residual ``x``; ``reuse`` serves block ``start``.

        Entering each stage of a device map moves ``x`` there and switches to the
        pass state of that device; the result comes with the state of the last block.
        """
        starts = self._stage_starts()
        for i in range(start, stop):
            raise_if_cancelled()  # a long batch stops within one block of a cancel
            if i == start or i in starts:
                x, state = self._enter(x, state, i)
            own = reuse.to(x.device) if reuse is not None and i == start else None
            x = self.blocks[i](x, state, own)
        return x, state

    def _stage_starts(self) -> set[int]:
        return {stage.start for stage in self.placement.stages}

    def _enter(
        self, x: torch.Tensor, state: PassState, layer: int
    ) -> tuple[torch.Tensor, PassState]:
        device = self.placement.device_of(layer)
        return placing.transfer(x, device), state.on(device)
