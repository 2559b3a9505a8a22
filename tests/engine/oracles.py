"""Naive per-cell oracles for sweeps: one full forward of the readable reference model
(``patchserve.models.reference``, which shares no code with the optimised runtime) per cell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from checkpoints import branch_scale, load_reference, reference_modules, submodule
from patchserve.engine.metrics import Grader
from patchserve.models import Transformer
from patchserve.models.reference import reference_forward

Write = tuple[str, int, int, int | None, torch.Tensor]  # hook, layer, position, head, source


def naive_logits(
    model: Transformer,
    ids: list[int],
    writes: list[Write],
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
    noise: tuple[list[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits ``[tokens, vocab]`` of a plain reference forward of ``ids`` with every write
    ``(1 - alpha*m) * h + alpha*m * s`` applied at its site; ``noise`` = ``(positions,
    [len(positions), width])`` is added to the residual entering block 0 before any write."""

    def write(at_layer: int, at_hook: str, x: torch.Tensor) -> torch.Tensor:
        if noise is not None and (at_layer, at_hook) == (0, "pre_attn"):
            x = x.clone()
            x[0, noise[0]] = (x[0, noise[0]].float() + noise[1].float()).to(x.dtype)
        mine = [w for w in writes if (w[1], w[0]) == (at_layer, at_hook)]
        if not mine:
            return x
        x = x.clone()
        for _, _, position, head, source in mine:
            weight = torch.full_like(source, alpha, dtype=torch.float32)
            if mask is not None:
                weight = weight * mask.float()
            index = (0, position) if head is None else (0, position, head)
            h = x[index]
            x[index] = ((1 - weight) * h.float() + weight * source.float()).to(x.dtype)
        return x

    logits, _ = reference_forward(model, torch.tensor([ids]), write)
    return logits[0]


def naive_cell(
    model: Transformer,
    corrupt_ids: list[int],
    hook: str,
    layer: int,
    position: int,
    source: torch.Tensor | dict[int, torch.Tensor],
    grader: Grader,
    *,
    head: int | None = None,
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
    noise: tuple[list[int], torch.Tensor] | None = None,
) -> float:
    """The metric of one patched cell: ``(1 - alpha*m) * h + alpha*m * s`` written at the
    site in a plain reference forward of the whole prompt. ``source`` may map several
    layers to their sources (a window: each written at ``hook`` of its layer); ``noise``
    as in :func:`naive_logits`."""
    sources = source if isinstance(source, dict) else {layer: source}
    writes = [(hook, w, position, head, s) for w, s in sources.items()]
    logits = naive_logits(model, corrupt_ids, writes, alpha, mask, noise)
    return float(grader(logits[-1:])[0])


def graded(metric: str, clean: torch.Tensor, corrupt: torch.Tensor, answer=None, foil=None):
    """A grader whose answer (the clean top-1 unless given), clean and corrupt baselines come
    from the last-position logits ``clean`` and ``corrupt`` of an independent forward."""
    clean_lp = torch.log_softmax(clean.double(), -1)
    corrupt_lp = torch.log_softmax(corrupt.double(), -1)
    answer = int(clean_lp.argmax()) if answer is None else answer

    def m(logits: torch.Tensor, logprobs: torch.Tensor) -> float:
        if foil is None:
            return float(logprobs[answer])
        return float(logits[answer].double() - logits[foil].double())

    return Grader(
        metric=metric,
        answer=answer,
        foil=foil,
        clean_logprobs=clean_lp,
        clean_score=m(clean, clean_lp),
        corrupt_score=m(corrupt, corrupt_lp),
    )


def reference_grader(
    model: Transformer,
    metric: str,
    clean_ids: list[int],
    corrupt_ids: list[int],
    answer: int | None = None,
    foil: int | None = None,
) -> Grader:
    """The grader of a sweep, its baselines from plain reference forwards of both prompts
    (never from the outcome under test)."""
    clean = naive_logits(model, clean_ids, [])[-1]
    corrupt = naive_logits(model, corrupt_ids, [])[-1]
    return graded(metric, clean, corrupt, answer, foil)


def reference_sigma(folder: Path) -> float:
    """σ of the noise, from the checkpoint's own embedding weights (``transformers``): the
    rows the residual receives (through OPT's ``project_in``), times Gemma's √hidden or
    Granite's ``embedding_multiplier``."""
    ref = load_reference(folder)
    weight = ref.get_input_embeddings().weight.detach()
    decoder = getattr(getattr(ref, "model", None), "decoder", None)
    project_in = getattr(decoder, "project_in", None)  # OPT-350m's narrower embedding
    if project_in is not None:
        with torch.no_grad():
            weight = project_in(weight)
    sigma = float(weight.double().std())
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"].startswith("gemma"):
        sigma *= config["hidden_size"] ** 0.5
    return sigma * abs(float(config.get("embedding_multiplier", 1.0)))


def reference_noise(
    sigma: float, width: int, positions: list[int], scale: float, seed: int, sample: int
) -> tuple[list[int], torch.Tensor]:
    """Sample ``sample``'s noise as docs/api.md documents the draw: ``scale * σ * N(0, 1)``
    ``[len(positions), width]``, float32 from ``torch.Generator().manual_seed(seed + sample)``."""
    generator = torch.Generator(device="cpu").manual_seed(seed + sample)
    z = torch.randn((len(positions), width), generator=generator, dtype=torch.float32)
    return positions, z * (scale * sigma)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """numpy's sample mean and its standard error ``std(ddof=1) / √n`` (0 for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(np.std(x, ddof=1) / np.sqrt(len(x)))


def naive_total(
    model: Transformer, prompt_ids: list[int], seq: list[int], writes: list[Write]
) -> float:
    """Teacher-forced ``Σ log p(seq_i | prompt, seq_<i)`` of a plain patched reference forward
    of the prompt and ``seq`` — one step at a time summed, as a reader would compute it."""
    logits = naive_logits(model, prompt_ids + seq[:-1], writes)
    total = 0.0
    for i, token in enumerate(seq):
        step = torch.log_softmax(logits[len(prompt_ids) - 1 + i].double(), -1)
        total += float(step[token])
    return total


def transformers_cell(
    ref, family: str, corrupt_ids: list[int], hook: str, layer: int, position: int, source
) -> torch.Tensor:
    """Last-position logits of ``transformers`` with the site overwritten by a module hook."""
    layers, attn, mlp = reference_modules(ref, family)
    if hook in ("attn_out", "mlp_out"):  # the module's output, before any branch scale
        source = source / branch_scale(ref, family)

    def write(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        # OPT's fc2 sees the tokens flattened: [tokens, d] for this one row
        rows = t if t.dim() == 3 else t.view(1, *t.shape)
        rows[:, position] = source
        return t

    def on_output(_module, _inputs, output):
        if isinstance(output, tuple):
            return (write(output[0]), *output[1:])
        return write(output)

    def on_input(_module, args, kwargs):
        if args:
            return (write(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}

    block = layers[layer]
    if hook == "post_block":
        handle = block.register_forward_hook(on_output)
    elif hook == "pre_attn":
        handle = block.register_forward_pre_hook(on_input, with_kwargs=True)
    elif hook == "attn_out":
        handle = submodule(block, attn).register_forward_hook(on_output)
    elif hook == "mlp_out":
        handle = submodule(block, mlp).register_forward_hook(on_output)
    else:
        raise ValueError(hook)
    try:
        with torch.inference_mode():
            return ref(torch.tensor([corrupt_ids])).logits[0, -1]
    finally:
        handle.remove()


def naive_head_grid(
    model: Transformer, clean_ids: list[int], corrupt_ids: list[int], answer: int, foil: int
) -> torch.Tensor:
    """``recovered`` logit difference ``[layer, head]`` of each head patched from the clean run
    at every position at once (prompts of equal length), by plain reference forwards."""
    _, clean = reference_forward(model, torch.tensor([clean_ids]))

    def diff(logits: torch.Tensor) -> float:
        return float(logits[-1, answer].double() - logits[-1, foil].double())

    m_clean, m_corrupt = (
        diff(naive_logits(model, clean_ids, [])),
        diff(naive_logits(model, corrupt_ids, [])),
    )
    cfg = model.cfg
    grid = torch.zeros(cfg.num_layers, cfg.num_heads, dtype=torch.float64)
    for layer in range(cfg.num_layers):
        z = clean[layer, "attn_head"][0]
        for head in range(cfg.num_heads):
            writes: list[Write] = [
                ("attn_head", layer, p, head, z[p, head]) for p in range(len(corrupt_ids))
            ]
            m = diff(naive_logits(model, corrupt_ids, writes))
            grid[layer, head] = (m - m_corrupt) / (m_clean - m_corrupt)
    return grid
