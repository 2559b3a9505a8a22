"""Generation benchmark: batched steered decoding against ``transformers``' batched ``generate``.

One run, one random checkpoint (Qwen3-shaped, 8 x 512 by default), prompts of mixed
lengths, greedy, one steering vector added at layer ``--layer``'s ``post_block`` at every
position. Timed side by side:

* **patchserve** — ``generate_batch``: every prompt prefilled and decoded together on one
  preallocated key/value block, the vector added per row by the runtime's hooks;
* **transformers** — ``model.generate`` on the left-padded batch (its cache grows by
  concatenation) with the same vector added by a forward hook on the decoder layer.

It prints tokens/s of each at every ``prompts x tokens`` point and the speed-up, and
how many rows produced the same greedy tokens (float rounding may flip a near tie).

    patchserve bench generate                       # 1, 8, 32 (and 64) x 32; 32 x 128
    patchserve bench generate --threads 2 --points 32x32 32x128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from patchserve.bench.sweep import build_checkpoint
from patchserve.cli.help import HelpFormatter
from patchserve.engine.generation import GenerationRequest, SteerVector, generate_batch
from patchserve.models import load_model
from patchserve.text.tokenizer import Tokenizer

DEFAULT_POINTS = ["1x32", "8x32", "32x32", "64x32", "32x128"]


def prompt_ids(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``count`` random prompts of 8 to 40 tokens (mixed lengths)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (count,), generator=gen).tolist()
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


def word_tokenizer(vocab: int) -> Tokenizer:
    """A word-level tokenizer of ``vocab`` words (the random checkpoint has none): every id
    detokenizes, as a served model's would."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_patchserve(
    model: Any, tokenizer: Any, prompts: list[list[int]], tokens: int, steer: SteerVector
) -> tuple[float, list[list[int]]]:
    requests = [
        GenerationRequest(p, max_tokens=tokens, temperature=0.0, steer=[steer]) for p in prompts
    ]
    _sync(model.device)
    start = time.perf_counter()
    results = generate_batch(model, tokenizer, requests)
    _sync(model.device)
    return time.perf_counter() - start, [r.token_ids for r in results]


def run_transformers(
    hf: Any, prompts: list[list[int]], tokens: int, layer: int, vector: torch.Tensor, scale: float
) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1

    def add(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] + scale * vector, *output[1:])
        return output + scale * vector

    handle = hf.model.layers[layer].register_forward_hook(add)
    try:
        _sync(vector.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids.to(vector.device),
                attention_mask=mask.to(vector.device),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        _sync(vector.device)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return seconds, out[:, width:].tolist()


def compare(
    path: Path,
    points: list[str],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    layer: int = 4,
    scale: float = 1.0,
) -> list[dict]:
    """Both sides on the checkpoint at ``path``, at every ``PROMPTSxTOKENS`` point."""
    import transformers as tf

    model = load_model(path, device=device, dtype=dtype).model
    tokenizer = word_tokenizer(model.cfg.vocab_size)
    hf: Any = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf = hf.to(device).eval()
    width, vocab = model.cfg.hidden_size, model.cfg.vocab_size
    vector = torch.randn(width, generator=torch.Generator().manual_seed(1))
    vector = (vector / vector.norm() * 4).to(device=device, dtype=dtype)
    steer = SteerVector(layer, "post_block", vector, scale)
    warm = prompt_ids(2, vocab, seed=99)
    run_patchserve(model, tokenizer, warm, 4, steer)
    run_transformers(hf, warm, 4, layer, vector, scale)
    rows = []
    for point in points:
        count, tokens = (int(x) for x in point.split("x"))
        prompts = prompt_ids(count, vocab)
        ours, ours_ids = run_patchserve(model, tokenizer, prompts, tokens, steer)
        theirs, their_ids = run_transformers(hf, prompts, tokens, layer, vector, scale)
        same = sum(a == b for a, b in zip(ours_ids, their_ids, strict=True))
        made = count * tokens
        rows.append(
            {
                "prompts": count,
                "tokens": tokens,
                "patchserve_tok_s": made / ours,
                "transformers_tok_s": made / theirs,
                "speedup": theirs / ours,
                "same_rows": f"{same}/{count}",
            }
        )
        print_row(rows[-1], file=sys.stderr)
    return rows


def run(args: argparse.Namespace) -> dict:
    import transformers as tf

    torch.set_num_threads(args.threads)
    folder = Path(args.cache or tempfile.gettempdir()) / "patchserve-bench"
    path = build_checkpoint("qwen3", args.layers, args.width, args.vocab, folder)
    rows = compare(path, args.points, layer=args.layer, scale=args.scale)
    return {
        "model": f"qwen3 {args.layers}x{args.width}, vocab {args.vocab}",
        "threads": args.threads,
        "steer": f"post_block layer {args.layer}, scale {args.scale}",
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "rows": rows,
    }


def print_row(row: dict, file: Any = sys.stdout) -> None:
    print(
        f"{row['prompts']:>4} x {row['tokens']:<4} patchserve {row['patchserve_tok_s']:8.1f} tok/s"
        f"   transformers {row['transformers_tok_s']:8.1f} tok/s   {row['speedup']:5.2f}x"
        f"   same greedy rows {row['same_rows']}",
        file=file,
        flush=True,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchserve bench generate",
        description="Batched steered generation against transformers' batched generate.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layer", type=int, default=4, help="the steered layer")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    p.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="PROMPTSxTOKENS to time")
    p.add_argument("--cache", help="where the random checkpoint is kept (default: tmp)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['model']}, {report['threads']} thread(s), steer {report['steer']}")
        for row in report["rows"]:
            print_row(row)
    return 0
