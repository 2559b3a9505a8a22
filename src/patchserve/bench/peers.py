"""The benchmark's peers: the usual ways of computing a ``post_block`` grid with other libraries.

Each peer computes the same grid as the engine — row ``r`` of a batch is the
corrupt prompt with the clean residual after block ``l`` written at position
``r`` — graded as the log-probability of ``answer`` at the last position, and
returns its timing and its grid (to check that it agrees). Every peer is
configured as fast as it allows: one batched forward per layer, and where the
library passes ``logits_to_keep=1`` through to ``transformers``, logits of the
last position only. TransformerLens is also timed as users usually run it
(full-vocabulary logits at every position), since that is what notebooks do.

Peers whose library is not installed are left out (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

Grid = list[list[float]]


@dataclass
class Result:
    name: str
    cells: int
    seconds: float
    note: str = ""

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.seconds


@dataclass
class Study:
    """The study every peer computes: prompts, swept layers and the graded answer."""

    checkpoint: Path
    clean: list[int]
    corrupt: list[int]
    layers: list[int]
    answer: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def ids(self, tokens: list[int], rows: int = 1) -> torch.Tensor:
        return torch.tensor([tokens], device=self.device).expand(rows, -1)

    def sync(self) -> None:
        """Wait for the device's queued work (timings on a GPU end when the work has)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def metric(self, logits: torch.Tensor) -> list[float]:
        """log p(answer) at the last position of each row (logits [rows, positions, vocab])."""
        return torch.log_softmax(logits[:, -1].double(), -1)[:, self.answer].tolist()


def _timed(
    study: Study, name: str, cells: int, note: str, work: Callable[[], Grid]
) -> tuple[Result, Grid]:
    study.sync()
    start = time.perf_counter()
    grid = work()
    study.sync()
    return Result(name, cells, time.perf_counter() - start, note), grid


def _load_hf(study: Study):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(study.checkpoint, dtype=study.dtype)
    return model.to(study.device).eval()  # type: ignore[arg-type]


def _output_tensor(output):
    """A decoder layer's hidden states (a tensor in transformers 5, a tuple's first before)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def transformers_hooks(study: Study) -> tuple[Result, Grid]:
    """A ``transformers`` model, a forward hook on the decoder layer, ``logits_to_keep=1``."""
    model = _load_hf(study)
    blocks = model.model.layers
    t = len(study.corrupt)
    clean_acts: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(
            lambda mod, args, out, i=i: clean_acts.__setitem__(i, _output_tensor(out)[0].clone())
        )
        for i, block in enumerate(blocks)
    ]
    with torch.inference_mode():
        model(study.ids(study.clean), logits_to_keep=1)
    for handle in handles:
        handle.remove()
    ids, rows = study.ids(study.corrupt, t), torch.arange(t, device=study.device)

    def work() -> Grid:
        grid = []
        for layer in study.layers:

            def patch(mod, args, out, clean=clean_acts[layer]):
                _output_tensor(out)[rows, rows] = clean[rows]
                return out

            handle = blocks[layer].register_forward_hook(patch)
            with torch.inference_mode():
                logits = model(ids, logits_to_keep=1).logits
            handle.remove()
            grid.append(study.metric(logits))
        return grid

    cells = len(study.layers) * t
    return _timed(study, "transformers forward hooks (batched)", cells, "logits_to_keep=1", work)


def nnsight_loop(study: Study) -> tuple[Result, Grid] | None:
    """nnsight's ``trace`` on the same ``transformers`` model, ``logits_to_keep=1``."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    model = NNsight(_load_hf(study))
    t = len(study.corrupt)
    saved = []
    with torch.inference_mode(), model.trace(input_ids=study.ids(study.clean)):
        for block in model.model.layers:
            saved.append(block.output.save())
    clean_acts = [_output_tensor(s)[0] for s in saved]
    ids, rows = study.ids(study.corrupt, t), torch.arange(t, device=study.device)

    def work() -> Grid:
        grid = []
        for layer in study.layers:
            with torch.inference_mode(), model.trace(input_ids=ids, logits_to_keep=1):
                _output_tensor(model.model.layers[layer].output)[rows, rows] = clean_acts[layer][
                    rows
                ]
                logits = model.lm_head.output.save()
            grid.append(study.metric(logits))
        return grid

    cells = len(study.layers) * t
    return _timed(study, "nnsight trace (batched)", cells, "logits_to_keep=1", work)


def transformer_lens_loops(study: Study, sample: int) -> list[tuple[Result, Grid | None]]:
    """TransformerLens: its patching helper (per cell), and a batched ``run_with_hooks`` loop
    both as users run it (logits at every position) and with ``logits_to_keep=1``."""
    try:
        from transformer_lens import patching
    except ImportError:
        return []
    from patchserve.bench.transformer_lens import load_hooked_transformer
    from patchserve.wire.hooks import TRANSFORMER_LENS_NAMES

    model = load_hooked_transformer(study.checkpoint, study.device, study.dtype)
    t = len(study.corrupt)
    clean_t, corrupt_t = study.ids(study.clean), study.ids(study.corrupt)
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean_t, names_filter=lambda n: "resid_post" in n)

    def metric_tensor(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[:, -1].double(), -1)[:, study.answer]

    index = __import__("pandas").DataFrame(
        [(layer, pos) for layer in study.layers[:1] for pos in range(min(sample, t))],
        columns=["layer", "pos"],
    )

    def per_cell() -> Grid:
        with torch.inference_mode():
            patching.generic_activation_patch(
                model,
                corrupt_t,
                cache,
                metric_tensor,
                patch_setter=patching.layer_pos_patch_setter,
                activation_name="resid_post",
                index_df=index,
                reduce="mean",
            )
        return []

    def batched(**kwargs) -> Callable[[], Grid]:
        def work() -> Grid:
            grid, rows = [], torch.arange(t, device=study.device)
            for layer in study.layers:
                name = f"blocks.{layer}.{TRANSFORMER_LENS_NAMES['post_block']}"

                def hook_fn(act, hook, clean=cache[name][0]):
                    act[rows, rows] = clean[rows]
                    return act

                with torch.inference_mode():
                    logits = model.run_with_hooks(
                        corrupt_t.expand(t, -1), fwd_hooks=[(name, hook_fn)], **kwargs
                    )
                grid.append(study.metric(logits))
            return grid

        return work

    cells = len(study.layers) * t
    helper, _ = _timed(
        study,
        "TransformerLens patching (per cell)",
        len(index),
        f"sampled {len(index)} cells",
        per_cell,
    )
    return [
        (helper, None),
        _timed(
            study,
            "TransformerLens batched run_with_hooks",
            cells,
            "as users run it: logits at every position",
            batched(),
        ),
        _timed(
            study,
            "TransformerLens batched, last logits",
            cells,
            "logits_to_keep=1",
            batched(logits_to_keep=1),
        ),
    ]
