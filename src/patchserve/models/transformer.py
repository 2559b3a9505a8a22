"""The hooked decoder-only transformer and its forward entry points.

``Transformer.forward`` is the single entry point; its arguments select the
variants the sweep engine and the server need:

* a full forward of token ids (optionally returning the key/value cache);
* a forward of a *suffix* of tokens on top of a :class:`KVCache` of the prefix,
  where a batch-1 cache is shared by every row without copying and each row
  may see a different prefix length (``prefix_lengths``);
* a forward that *starts at layer l* from a supplied residual stream
  (``hidden``, the ``pre_attn`` input of block ``l``);
* logits only where they are read (``logits_at``), or none at all.

Interventions and captures travel in a :class:`HookContext`. The pass's state
(cache, reuse, masks, rope tables) is ``models/state.py``; where its tokens sit,
``models/layout.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from patchserve.cancel import raise_if_cancelled
from patchserve.models.block import DecoderBlock
from patchserve.models.config import ModelConfig
from patchserve.models.hooks import HookContext
from patchserve.models.layers import Rotary, make_norm
from patchserve.models.layout import Layout
from patchserve.models.state import KVCache, PassState, Reuse

LogitsAt = Literal["last", "all"] | torch.Tensor | None


@dataclass
class ForwardResult:
    logits: torch.Tensor | None  # [batch, k, vocab] at the requested positions
    captured: dict[tuple[int, str], torch.Tensor]
    kv: KVCache | None  # keys/values of the tokens this pass computed
    hidden: torch.Tensor  # residual stream leaving the last block run, before the final norm


class Transformer(nn.Module):
    """A decoder-only LM built from a :class:`ModelConfig`; weights come from a family loader."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_positions = (
            nn.Embedding(cfg.max_position_embeddings, d) if cfg.learned_positions else None
        )
        self.blocks = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.num_layers))
        self.final_norm = make_norm(cfg.norm_kind, d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        ropes = sorted({r for r in cfg.rope if r is not None}, key=repr)
        self._rotaries = {r: Rotary(r) for r in ropes}
        self.rotary_modules = nn.ModuleList(self._rotaries.values())  # registered as submodules

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0 (before its ``pre_attn`` hook)."""
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale is not None:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        return x

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a residual stream leaving the last block."""
        logits = self.lm_head(self.final_norm(hidden))
        cap = self.cfg.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        start_layer: int = 0,
        reuse: Reuse | None = None,
        offsets: torch.Tensor | int | None = None,
        lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix_lengths: torch.Tensor | None = None,
        hooks: HookContext | None = None,
        logits_at: LogitsAt = "last",
        return_kv: bool = False,
        narrow_last: bool = False,
    ) -> ForwardResult:
        """Run blocks ``start_layer..L-1`` over a batch of token rows.

        Rows are either padded — ``input_ids`` ``[batch, tokens]`` / ``hidden``
        ``[batch, tokens, d]``, right-padded to ``lengths`` — or packed —
        ``input_ids`` ``[N]`` / ``hidden`` ``[N, d]`` holding the rows back to back,
        with ``lengths`` (required) giving each row's token count.

        Args:
            input_ids: token ids (with ``start_layer == 0``).
            hidden: residual stream entering block ``start_layer`` (instead of ids).
            reuse: unchanged attention output of block ``start_layer`` (see :class:`Reuse`).
            offsets: absolute position of each row's first token; defaults to
                the cache length (0 without a cache).
            lengths: real tokens per row; defaults to all (padded input).
            cache: keys/values of the prefix, batch 1 (shared) or ``batch``.
            prefix_lengths: how many prefix tokens each row sees; defaults to ``offsets``.
            hooks: interventions to apply and sites to capture.
            logits_at: ``"last"`` (last real token of each row, ``[batch, 1, V]``),
                ``"all"`` (every token, in the input's layout), a ``[batch, k]``
                tensor of token indices (padded input), or None for no logits.
            return_kv: also return the keys/values of the computed tokens
                (padded ``[batch, kv_heads, tokens, head_dim]``).
            narrow_last: with ``logits_at="last"``, run the final block's queries,
                output projection and MLP for the rows' last tokens only (their
                keys and values still cover every token). Same values up to float
                rounding; ``hidden`` is then ``[batch, d]``. Ignored when the final
                block is captured or keys/values are returned.
        """
        if (input_ids is None) == (hidden is None):
            raise ValueError("pass exactly one of input_ids and hidden")
        if input_ids is not None and start_layer != 0:
            raise ValueError("input_ids start at layer 0; pass hidden to start higher")
        ref = input_ids if input_ids is not None else hidden
        assert ref is not None
        packed = ref.dim() == (1 if input_ids is not None else 2)
        device = ref.device
        if packed:
            if lengths is None:
                raise ValueError("packed rows need lengths")
            if int(lengths.sum()) != ref.shape[0]:
                raise ValueError("packed rows: lengths must add up to the token count")
            b, t = lengths.shape[0], int(lengths.max())
        else:
            b, t = ref.shape[:2]
        if offsets is None:
            offsets = cache.length if cache is not None else 0
        offsets_t = torch.as_tensor(offsets, dtype=torch.long, device=device).reshape(-1)
        offsets_t = offsets_t.expand(b) if offsets_t.shape[0] == 1 else offsets_t
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=device)
        if prefix_lengths is None and cache is not None:
            prefix_lengths = offsets_t
        prefix_total = cache.length if cache is not None else 0
        layout = Layout(offsets_t, lengths.to(device), t, packed, prefix_lengths, prefix_total)
        if return_kv and len(layout.groups) > 1:
            raise ValueError("return_kv needs rows of one attention group (padded rows)")
        hooks = hooks if hooks is not None else HookContext()
        hooks.layout = layout
        last = self.cfg.num_layers - 1
        narrow = (
            narrow_last
            and isinstance(logits_at, str)
            and logits_at == "last"
            and not return_kv
            and start_layer <= last
            and not any(layer == last for layer, _ in hooks.capture)
        )
        state = PassState(
            hooks=hooks,
            layout=layout,
            prefix=cache,
            rotaries=self._rotaries,
            dtype=self.dtype,
            keep_cache=return_kv,
            narrow_layer=last if narrow else None,
        )
        x = self.embed(input_ids, layout.positions) if input_ids is not None else hidden
        assert x is not None
        for block in self.blocks[start_layer:]:
            raise_if_cancelled()  # a long batch stops within one block of a cancel
            x = block(x, state, reuse if block.layer == start_layer else None)
        logits = None
        if logits_at is not None:
            if isinstance(logits_at, str) and logits_at == "all":
                picked = x
            elif narrow:
                picked = x[:, None]  # the final block already kept the last tokens only
            elif isinstance(logits_at, str) and logits_at == "last":
                picked = layout.last(x)
            else:
                if packed:
                    raise ValueError("token indices for logits need padded rows")
                index = torch.as_tensor(logits_at, dtype=torch.long, device=device)
                picked = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            logits = self.unembed(picked)
        kv = None
        if return_kv:
            n = self.cfg.num_layers
            kv = KVCache(
                [state.new_keys[i][0] if i in state.new_keys else None for i in range(n)],
                [state.new_keys[i][1] if i in state.new_keys else None for i in range(n)],
            )
        return ForwardResult(logits=logits, captured=hooks.captured, kv=kv, hidden=x)
