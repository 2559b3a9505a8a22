"""Which hooks a ``transformers`` model gives exactly, decided by numbers at load time.

One short probe prompt runs through the model twice: ``transformers``' own forward (the
reference logits) and the generic runtime's pass with recording hooks on every discovered
module. The runtime serves the model only if its passes reproduce the reference — the full
pass, a prefix cache then the rest, and a pass resumed from a middle layer on the cache —
and each decoder layer's output is the next one's input (``post_block@l = pre_attn@l+1``).
On top of ``pre_attn`` and ``post_block`` it offers:

* ``attn_out``, ``mlp_out``, ``mlp_in`` when the attention and MLP modules run once per
  layer and ``pre_attn + attn_out + mlp_out == post_block`` (their outputs are what the
  branches add to the residual: no norm or scale after them);
* ``attn_head`` when the attention's output projection runs once per layer on
  ``heads x head_dim`` inputs.

``post_attn`` (the residual between the branches) is never a module's output or input in
these layouts, so it is never offered. Everything else is a :class:`CheckpointError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from patchserve.models.config import CheckpointError
from patchserve.models.generic.adapters import input_tensor, output_tensor
from patchserve.models.generic.model import TransformersModel
from patchserve.models.hooks import HOOKS, HookContext
from patchserve.models.layout import ResumeRows

PROBE_TOKENS = 9
SPLIT = 5  # the prefix-cache check: SPLIT tokens, then the rest on their cache


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of "the same numbers" in ``dtype``."""
    return (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 3e-2)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    rtol, atol = _tolerance(dtype)
    scale = float(b.double().abs().max()) or 1.0
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol * scale))


class _Recorder:
    """Forward hooks that record each discovered module's inputs/outputs and call counts."""

    def __init__(self, model: TransformersModel) -> None:
        self.seen: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.handles: list[RemovableHandle] = []
        s = model.structure
        for i in range(model.cfg.num_layers):
            self._watch(s.layers[i], i, "layer_in", "layer_out")
            if s.attention[i] is not None:
                self._watch(s.attention[i], i, None, "attn")
            if s.mlp[i] is not None:
                self._watch(s.mlp[i], i, "mlp_in", "mlp_out")
            if s.out_proj[i] is not None:
                self._watch(s.out_proj[i], i, "proj_in", None)

    def _watch(self, module: Any, layer: int, into: str | None, out: str | None) -> None:
        def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if into is not None:
                self.seen.setdefault((into, layer), []).append(input_tensor(args, kwargs))

        def post(m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if out is not None:
                self.seen.setdefault((out, layer), []).append(output_tensor(output))
                self.seen.setdefault((f"{out}_tuple", layer), []).append(
                    torch.tensor(not isinstance(output, torch.Tensor))
                )

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post))

    def once(self, name: str, layer: int) -> torch.Tensor | None:
        """The one recorded tensor (None when the module ran zero or several times)."""
        found = self.seen.get((name, layer), [])
        return found[0] if len(found) == 1 else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def probe_ids(vocab: int) -> torch.Tensor:
    """A fixed probe prompt of ordinary token ids (away from the special ids at the start)."""
    ids = [(7 + 13 * i) % max(vocab - 8, 1) + 4 for i in range(PROBE_TOKENS)]
    return torch.tensor([ids])


def offered_hooks(model: TransformersModel) -> tuple[str, ...]:
    """The hooks ``model`` gives exactly; sets ``model.offered_hooks`` and how layers return.

    Raises :class:`CheckpointError` when the runtime's passes do not reproduce the model.
    """
    cfg, s = model.cfg, model.structure
    name = cfg.architecture
    if s.final_norm is None:
        raise CheckpointError(f"{name}: no final norm found in the base model's modules")
    ids = probe_ids(cfg.vocab_size).to(model.device)
    with torch.inference_mode():
        reference = model.hf(ids).logits[0].float()
        recorder = _Recorder(model)
        try:
            model.offered_hooks = ("pre_attn", "post_block")
            out = model.prefill(ids, HookContext.build(capture=[(1, "pre_attn")]))
        finally:
            recorder.remove()
        model.layer_returns_tuple = bool(recorder.seen[("layer_out_tuple", 0)][0])
        _check_passes(model, recorder, reference, out, ids, name)
        model.batch_offsets = _offsets_batch(model, reference, out)
    offered = {"pre_attn", "post_block"}
    if _branches_exact(model, recorder):
        offered |= {"attn_out", "mlp_in", "mlp_out"}
    if _heads_exact(model, recorder):
        offered.add("attn_head")
    model.offered_hooks = tuple(h for h in HOOKS if h in offered)
    return model.offered_hooks


def _check_passes(
    model: TransformersModel,
    recorder: _Recorder,
    reference: torch.Tensor,
    out: Any,
    ids: torch.Tensor,
    name: str,
) -> None:
    n, dtype = model.cfg.num_layers, model.dtype
    for i in range(n):
        x_in, y = recorder.once("layer_in", i), recorder.once("layer_out", i)
        if x_in is None or y is None:
            raise CheckpointError(f"{name}: decoder layer {i} did not run exactly once a pass")
        nxt = recorder.once("layer_in", i + 1) if i + 1 < n else None
        if nxt is not None and not torch.equal(nxt, y):
            raise CheckpointError(
                f"{name}: the input of decoder layer {i + 1} is not the output of layer {i} "
                "(the model changes the residual between layers); the generic runtime "
                "cannot place post_block / pre_attn exactly"
            )
    first = model.prefill(ids[:, :SPLIT])
    rest = model.extend(ids[:, SPLIT:], first.cache)
    split = torch.cat([model.unembed(first.hidden[0]), model.unembed(rest.hidden[0])])
    checks = [
        ("a full pass", model.unembed(out.hidden[0]), reference),
        ("a pass on a prefix cache", split, reference),
    ]
    if n > 1:
        hidden = out.captured[1, "pre_attn"][0, SPLIT:]
        rows = ResumeRows.build(hidden, SPLIT, torch.tensor([hidden.shape[0]]))
        resumed = model.resume(rows, 1, out.cache)
        checks.append(("a pass resumed at layer 1", resumed[0], reference[-1]))
    for what, got, expected in checks:
        if not _close(got.float(), expected, dtype):
            raise CheckpointError(
                f"{name}: the generic runtime's {what} does not reproduce transformers' "
                "logits on a probe prompt; this architecture cannot be served exactly"
            )


def _offsets_batch(model: TransformersModel, reference: torch.Tensor, out: Any) -> bool:
    """Whether resumed rows at different offsets can share one padded forward, each masked
    to its own cached prefix (exact unless the model reads positions from the mask's slots,
    e.g. ALiBi, or a sliding window binds): two unpatched rows resumed at layer 1 give the
    reference's last logits. Models whose window is shorter than the probe fail it, and
    resume one forward per offset even on prompts the window would not bind."""
    if model.cfg.num_layers < 2:
        return False
    hidden = out.captured[1, "pre_attn"][0]
    t = hidden.shape[0]
    offsets = torch.tensor([3, SPLIT + 1])
    rows = ResumeRows.build(torch.cat([hidden[3:], hidden[SPLIT + 1 :]]), offsets, t - offsets)
    window, model.window = model.window, None  # the padded path itself, even past a window
    model.batch_offsets = True
    try:
        logits = model.resume(rows, 1, out.cache)
    finally:
        model.batch_offsets, model.window = False, window
    expected = reference[-1].expand(2, -1)
    return _close(logits.float(), expected, model.dtype)


def _branches_exact(model: TransformersModel, recorder: _Recorder) -> bool:
    """Whether attention and MLP outputs are the branch additions of every layer."""
    for i in range(model.cfg.num_layers):
        x, y = recorder.once("layer_in", i), recorder.once("layer_out", i)
        a, m = recorder.once("attn", i), recorder.once("mlp_out", i)
        if x is None or y is None or a is None or m is None or recorder.once("mlp_in", i) is None:
            return False
        if a.shape != y.shape or m.shape != y.shape:
            return False
        if not _close(x.double() + a.double() + m.double(), y, model.dtype):
            return False
    return True


def _heads_exact(model: TransformersModel, recorder: _Recorder) -> bool:
    """Whether the output projection's input is every layer's ``heads x head_dim`` outputs."""
    cfg = model.cfg
    for i in range(cfg.num_layers):
        z = recorder.once("proj_in", i)
        if z is None or z.shape[-1] != cfg.num_heads * cfg.head_dim:
            return False
    return True
