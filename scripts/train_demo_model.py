"""Train patchserve's bundled demo model, ``demo_facts``, from scratch on CPU.

The demo model is a small Qwen3-architecture causal LM trained on a synthetic corpus that
this script generates deterministically:

* factual-recall statements over invented entities (countries and their capitals, people
  and their professions and home towns, objects and their colours), several templates per
  relation, subjects of one to three tokens, answers of exactly one token;
* indirect-object-identification (IOI) sentences ("When Mary and John went to the store,
  John gave a drink to Mary.") so that name-mover structure exists.

It trains a byte-level BPE tokenizer, trains the model with plain AdamW, measures fact
and IOI accuracy, picks clean/corrupt example pairs on which causal tracing finds real
structure (checked automatically, see :func:`select_examples`) and writes a standard
Hugging Face checkpoint plus ``examples.json`` and ``training_log.json``.

Everything is seeded and runs with ``torch.use_deterministic_algorithms(True)`` and two
threads, so re-running the command reproduces the shipped weights on the same machine
type::

    python scripts/train_demo_model.py --out src/patchserve/assets/demo_facts
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

DEFAULT_OUT = Path("src/patchserve/assets/demo_facts")
SPECIAL = "<|endoftext|>"
THREADS = 2

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
CODAS = "nrlsm"

PROFESSIONS = (
    "baker", "farmer", "doctor", "painter", "sailor", "miner", "tailor", "poet", "lawyer",
    "dancer", "pilot", "nurse", "teacher", "singer", "writer", "hunter", "potter", "judge",
    "cook", "banker",
)  # fmt: skip
COLOURS = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "pink", "purple", "grey",
    "gold", "silver",
)  # fmt: skip
IOI_NAMES = (
    "Mary", "John", "Anna", "Paul", "Sarah", "David", "Emma", "Mark", "Laura", "James",
    "Kate", "Tom", "Lucy", "Peter", "Alice", "Brian", "Clara", "Daniel", "Eva", "Frank",
    "Grace", "Henry", "Iris", "Jack", "Lena", "Max", "Nina", "Oscar", "Rosa", "Sam",
)  # fmt: skip
IOI_PLACES = ("store", "park", "market", "school", "beach", "station", "garden", "library")
IOI_OBJECTS = ("drink", "ball", "book", "gift", "letter", "key", "cake", "note")

# Templates: (relation, prompt with {s} for the subject). The answer follows the prompt
# after one space, then a full stop. "capital_of" reads a city and answers its country.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {s} is",
        "{s}'s capital city is",
        "In {s}, the seat of government is",
    ),
    "capital_of": ("{s} is the capital of",),
    "profession": (
        "{s} works as a",
        "By profession, {s} is a",
        "{s} earns a living as a",
    ),
    "hometown": (
        "{s} was born in",
        "{s} grew up in the city of",
        "The home town of {s} is",
    ),
    "colour": (
        "The colour of the {s} is",
        "Every {s} is painted",
        "Each {s} is coloured",
    ),
}
IOI_TEMPLATES = (
    "When {a} and {b} went to the {place}, {s} gave a {obj} to",
    "After {a} and {b} arrived at the {place}, {s} handed a {obj} to",
    "Then {a} and {b} had lunch at the {place}. {s} passed the {obj} to",
    "While {a} and {b} were at the {place}, {s} threw a {obj} to",
)


@dataclass(frozen=True)
class Item:
    """One training statement: ``prompt + " " + answer + "."``."""

    relation: str
    template: str
    subject: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}."


@dataclass
class World:
    """The invented entities and the facts that hold about them."""

    capital: dict[str, str] = field(default_factory=dict)  # country -> city
    profession: dict[str, str] = field(default_factory=dict)  # person -> profession
    hometown: dict[str, str] = field(default_factory=dict)  # person -> city
    colour: dict[str, str] = field(default_factory=dict)  # object -> colour
    single_words: list[str] = field(default_factory=list)  # words the tokenizer keeps whole
    pieces: list[str] = field(default_factory=list)  # name parts for multi-token names


# ----------------------------------------------------------------------------- world


class NameMaker:
    """Invents unique syllable-composed words, deterministic under a seeded RNG."""

    def __init__(self, rng: random.Random, reserved: Sequence[str]) -> None:
        self.rng = rng
        self.used = {w.lower() for w in reserved}

    def syllable(self, coda: bool) -> str:
        s = self.rng.choice(CONSONANTS) + self.rng.choice(VOWELS)
        return s + self.rng.choice(CODAS) if coda else s

    def word(self) -> str:
        """A fresh two-syllable word such as ``velmar``."""
        while True:
            w = self.syllable(self.rng.random() < 0.5) + self.syllable(True)
            if w not in self.used:
                self.used.add(w)
                return w

    def pieces(self, n: int) -> list[str]:
        """``n`` distinct one-syllable pieces such as ``kal`` (closed syllables)."""
        out: list[str] = []
        while len(out) < n:
            p = self.syllable(True)
            if p not in self.used:
                self.used.add(p)
                out.append(p)
        return out

    def compound(self, heads: list[str], tails: list[str], n_tails: int) -> str:
        """A fresh name made of one head piece and ``n_tails`` tail pieces."""
        while True:
            w = self.rng.choice(heads) + "".join(self.rng.choice(tails) for _ in range(n_tails))
            if w not in self.used:
                self.used.add(w)
                return w


def make_names(maker: NameMaker, count: int, heads: list[str], tails: list[str]) -> list[str]:
    """``count`` names, a third meant to be one token, a third two and a third three."""
    names = []
    for i in range(count):
        kind = i % 3
        names.append(maker.word() if kind == 0 else maker.compound(heads, tails, kind))
    return names


def make_world(seed: int, n_countries: int, n_people: int, n_objects: int) -> World:
    """Invent all entities and draw their facts."""
    rng = random.Random(seed)
    reserved = [*PROFESSIONS, *COLOURS, *IOI_NAMES, *IOI_PLACES, *IOI_OBJECTS]
    maker = NameMaker(rng, reserved)
    heads, tails = maker.pieces(24), maker.pieces(20)
    world = World(pieces=[*heads, *tails])
    cities = [maker.word().capitalize() for _ in range(n_countries)]
    countries = [n.capitalize() for n in make_names(maker, n_countries, heads, tails)]
    people = [n.capitalize() for n in make_names(maker, n_people, heads, tails)]
    objects = make_names(maker, n_objects, heads, tails)
    world.capital = dict(zip(countries, cities, strict=True))
    world.profession = {p: rng.choice(PROFESSIONS) for p in people}
    world.hometown = {p: rng.choice(cities) for p in people}
    world.colour = {o: rng.choice(COLOURS) for o in objects}
    # Names built by make_names with kind 0 are meant to be single tokens.
    single = [n for names in (countries, people, objects) for n in names[::3]]
    world.single_words = [*cities, *single]
    return world


def fact_items(world: World) -> list[Item]:
    """Every (fact, template) statement of the corpus."""
    tables = {
        "capital": world.capital,
        "capital_of": {city: country for country, city in world.capital.items()},
        "profession": world.profession,
        "hometown": world.hometown,
        "colour": world.colour,
    }
    items = []
    for relation, templates in FACT_TEMPLATES.items():
        for template in templates:
            for subject, answer in tables[relation].items():
                prompt = template.format(s=subject)
                items.append(Item(relation, template, subject, prompt, answer))
    return items


def ioi_item(rng: random.Random, template: str | None = None) -> Item:
    """A random IOI sentence; the answer is the name that is not repeated."""
    template = template or rng.choice(IOI_TEMPLATES)
    a, b = rng.sample(IOI_NAMES, 2)
    s = rng.choice((a, b))
    answer = b if s == a else a
    prompt = template.format(
        a=a, b=b, s=s, place=rng.choice(IOI_PLACES), obj=rng.choice(IOI_OBJECTS)
    )
    return Item("ioi", template, s, prompt, answer)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_corpus(world: World) -> list[str]:
    """Strings the BPE is trained on: template text, answers, names and name pieces.

    Multi-token names themselves are left out, so the BPE learns their pieces but not the
    whole names; every answer value is in, so it becomes a single token (with and without
    its leading space).
    """
    fragments: list[str] = []
    templates = [t for ts in FACT_TEMPLATES.values() for t in ts] + list(IOI_TEMPLATES)
    for t in templates:
        for part in t.replace("{", "\0{").replace("}", "}\0").split("\0"):
            if part and not part.startswith("{"):
                fragments.append(part)
    words = [*world.single_words, *PROFESSIONS, *COLOURS, *IOI_NAMES, *IOI_PLACES, *IOI_OBJECTS]
    words += [p for p in world.pieces] + [p.capitalize() for p in world.pieces]
    for w in words:
        fragments += [w, " " + w, w + ".", " " + w + "."]
    return fragments * 20


def train_tokenizer(world: World, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<|endoftext|>`` as BOS/EOS/pad, prepended to every encoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(world), trainer=trainer)
    bos = tok.token_to_id(SPECIAL)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A $B", special_tokens=[(SPECIAL, bos)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Encoded:
    """Token ids of an item: the prompt (with BOS), the answer token, the full sequence."""

    item: Item
    prompt_ids: tuple[int, ...]
    answer_id: int
    full_ids: tuple[int, ...]


def encode_items(tok: PreTrainedTokenizerFast, items: Sequence[Item]) -> list[Encoded]:
    """Tokenize statements; the prompt's ids must be a prefix of the statement's."""
    prompts = tok([it.prompt for it in items])["input_ids"]
    fulls = tok([it.text for it in items])["input_ids"]
    out = []
    for it, p, f in zip(items, prompts, fulls, strict=True):
        if list(f[: len(p)]) != list(p):
            raise ValueError(f"prompt is not a token prefix of its statement: {it.text!r}")
        out.append(Encoded(it, tuple(p), f[len(p)], (*f, tok.eos_token_id)))
    return out


def batches(
    rng: random.Random,
    facts: list[Encoded],
    ioi_pool: list[Encoded],
    batch_size: int,
    ioi_fraction: float,
    pad_id: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches; 8 batches at a time are grouped by length."""
    n_ioi = round(batch_size * ioi_fraction)
    ioi_iter = itertools.cycle(ioi_pool)
    while True:
        group = [rng.choice(facts).full_ids for _ in range(8 * (batch_size - n_ioi))]
        group += [next(ioi_iter).full_ids for _ in range(8 * n_ioi)]
        rng.shuffle(group)
        group.sort(key=len)
        chunks = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield pad_batch(chunk, pad_id)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad; padded label positions are -100 (causal attention never sees the pads)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


# ----------------------------------------------------------------------------- model


def build_model(tok: PreTrainedTokenizerFast, args: argparse.Namespace) -> Qwen3ForCausalLM:
    """A freshly initialised Qwen3 model sized by the command line."""
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.inference_mode()
def last_logprobs(model: Qwen3ForCausalLM, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Next-token log-probabilities after each prompt, ``[n, vocab]``."""
    out = []
    for i in range(0, len(prompts), 256):
        chunk = prompts[i : i + 256]
        ids, _ = pad_batch(chunk, 0)
        logits = model(input_ids=ids).logits
        last = torch.tensor([len(p) - 1 for p in chunk])
        out.append(torch.log_softmax(logits[torch.arange(len(chunk)), last].float(), -1))
    return torch.cat(out)


def accuracy(model: Qwen3ForCausalLM, data: Sequence[Encoded]) -> float:
    """Top-1 accuracy of the answer token after each prompt."""
    lp = last_logprobs(model, [e.prompt_ids for e in data])
    want = torch.tensor([e.answer_id for e in data])
    return float((lp.argmax(-1) == want).float().mean())


def accuracy_by_relation(model: Qwen3ForCausalLM, data: Sequence[Encoded]) -> dict[str, float]:
    """Top-1 accuracy per relation."""
    relations = sorted({e.item.relation for e in data})
    return {r: accuracy(model, [e for e in data if e.item.relation == r]) for r in relations}


def train(
    model: Qwen3ForCausalLM,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    eval_facts: list[Encoded],
    args: argparse.Namespace,
) -> dict[str, list]:
    """Plain AdamW training loop; returns the loss curve and accuracy checkpoints."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    curve: list[dict[str, float]] = []
    checkpoints: list[dict[str, float]] = []
    window: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        ids, labels = next(data)
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(float(loss))
        if (step + 1) % 50 == 0:
            curve.append({"step": step + 1, "loss": round(sum(window) / len(window), 4)})
            window = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc = accuracy(model, eval_facts)
            elapsed = time.perf_counter() - start
            checkpoints.append({"step": step + 1, "fact_accuracy": round(acc, 4)})
            print(
                f"step {step + 1:5d}  loss {curve[-1]['loss']:.4f}  fact acc {acc:.4f}"
                f"  {elapsed:6.1f}s",
                flush=True,
            )
    model.eval()
    return {"loss_curve": curve, "accuracy_checkpoints": checkpoints}


# ----------------------------------------------------------------------------- examples


@torch.inference_mode()
def post_block_sweep(
    model: Qwen3ForCausalLM, clean: Sequence[int], corrupt: Sequence[int], answer: int, foil: int
) -> torch.Tensor:
    """``recovered`` of logit(answer) - logit(foil) for every post_block (layer, position).

    Cell (l, p) runs the corrupt prompt with the output of decoder layer ``l`` at position
    ``p`` replaced by the clean run's; the cells of one layer are the rows of one batch.
    """
    layers = model.model.layers
    n = len(clean)
    captured: dict[int, torch.Tensor] = {}

    def capture(idx: int):
        def hook(_module, _inputs, output):
            captured[idx] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        clean_logits = model(input_ids=torch.tensor([clean])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    corrupt_logits = model(input_ids=torch.tensor([corrupt])).logits[0, -1]
    m_clean = float(clean_logits[answer] - clean_logits[foil])
    m_corrupt = float(corrupt_logits[answer] - corrupt_logits[foil])
    rows = torch.arange(n)
    grid = torch.empty(len(layers), n)
    for idx, layer in enumerate(layers):

        def patch(_module, _inputs, output, idx=idx):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[rows, rows] = captured[idx][0, rows]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = layer.register_forward_hook(patch)
        try:
            logits = model(input_ids=torch.tensor([corrupt] * n)).logits[:, -1]
        finally:
            handle.remove()
        m_cell = logits[:, answer] - logits[:, foil]
        grid[idx] = (m_cell - m_corrupt) / (m_clean - m_corrupt)
    return grid


def differing_positions(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Positions where two equal-length token sequences differ."""
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


@dataclass
class Candidate:
    """A clean/corrupt pair under evaluation."""

    relation: str
    template: str
    clean: Encoded
    corrupt: Encoded
    n_subject_tokens: int


def candidate_pairs(rng: random.Random, encoded: list[Encoded]) -> list[Candidate]:
    """All same-template pairs whose prompts have equal length and one differing span."""
    by_template: dict[str, list[Encoded]] = {}
    for e in encoded:
        by_template.setdefault(e.item.template, []).append(e)
    out = []
    for template, group in by_template.items():
        for a, b in itertools.permutations(group, 2):
            if len(a.prompt_ids) != len(b.prompt_ids) or a.answer_id == b.answer_id:
                continue
            diff = differing_positions(a.prompt_ids, b.prompt_ids)
            if not diff or diff != list(range(diff[0], diff[-1] + 1)):
                continue
            n_sub = len(a.prompt_ids) - len(encoded_without(a))
            out.append(Candidate(a.item.relation, template, a, b, n_sub))
    rng.shuffle(out)
    return out


def encoded_without(e: Encoded) -> tuple[int, ...]:
    """Placeholder used by :func:`candidate_pairs`; replaced with exact counts below."""
    return e.prompt_ids[: len(e.prompt_ids) - subject_token_count(e)]


_SUBJECT_COUNTS: dict[tuple[str, str], int] = {}


def subject_token_count(e: Encoded) -> int:
    """Number of prompt tokens that belong to the subject (precomputed per item)."""
    return _SUBJECT_COUNTS[(e.item.template, e.item.subject)]


def check_candidate(
    model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast, c: Candidate
) -> dict | None:
    """Measure one pair; return its record if it meets every demo criterion."""
    lp = last_logprobs(model, [c.clean.prompt_ids, c.corrupt.prompt_ids])
    answer, foil = int(lp[0].argmax()), int(lp[1].argmax())
    if answer != c.clean.answer_id or foil != c.corrupt.answer_id or answer == foil:
        return None
    answer_text, foil_text = tok.decode([answer]), tok.decode([foil])
    # The demo answer must be the whole answer word (not the first piece of a name).
    if answer_text != " " + c.clean.item.answer or foil_text != " " + c.corrupt.item.answer:
        return None
    p_clean = math.exp(float(lp[0, answer]))
    gap = float(lp[0, answer] - lp[1, answer])
    if p_clean <= 0.5 or gap <= 1.0:
        return None
    grid = post_block_sweep(model, c.clean.prompt_ids, c.corrupt.prompt_ids, answer, foil)
    diff = differing_positions(c.clean.prompt_ids, c.corrupt.prompt_ids)
    best0 = int(grid[0].argmax())
    if float(grid.max()) < 0.8 or best0 not in diff:
        return None
    return {
        "clean": c.clean.item.prompt,
        "corrupt": c.corrupt.item.prompt,
        "answer": answer_text,
        "foil": foil_text,
        "relation": c.relation,
        "_metrics": {
            "template": c.template,
            "subject_tokens": c.n_subject_tokens,
            "prompt_tokens": len(c.clean.prompt_ids),
            "p_clean_answer": round(p_clean, 4),
            "logprob_gap": round(gap, 4),
            "sweep_max": round(float(grid.max()), 4),
            "layer0_best_position": best0,
            "layer0_best_recovered": round(float(grid[0].max()), 4),
            "differing_positions": diff,
        },
    }


def select_examples(
    model: Qwen3ForCausalLM,
    tok: PreTrainedTokenizerFast,
    facts: list[Encoded],
    ioi: list[Encoded],
    seed: int,
    per_template: int,
    n_ioi: int,
) -> list[dict]:
    """Pick pairs automatically: per template, spread over subject token counts."""
    rng = random.Random(seed)
    chosen: list[dict] = []
    candidates = candidate_pairs(rng, facts)
    for template in [t for ts in FACT_TEMPLATES.values() for t in ts]:
        pool = [c for c in candidates if c.template == template]
        picked: list[dict] = []
        for size in itertools.cycle(sorted({c.n_subject_tokens for c in pool})):
            if len(picked) >= per_template or not pool:
                break
            match = next((c for c in pool if c.n_subject_tokens == size), None)
            while match is not None:
                pool.remove(match)
                record = check_candidate(model, tok, match)
                if record is not None:
                    picked.append(record)
                    break
                match = next((c for c in pool if c.n_subject_tokens == size), None)
            if match is None and not any(c.n_subject_tokens == size for c in pool):
                pool = [c for c in pool if c.n_subject_tokens != size]
                if not pool:
                    break
        chosen += picked
    for c in ioi_pairs(tok, ioi):
        if sum(r["relation"] == "ioi" for r in chosen) >= n_ioi:
            break
        record = check_candidate(model, tok, c)
        if record is not None:
            chosen.append(record)
    return chosen


def ioi_pairs(tok: PreTrainedTokenizerFast, ioi: list[Encoded]) -> Iterator[Candidate]:
    """IOI pairs: the corrupt prompt repeats the other name, which flips the answer."""
    for e in ioi:
        it = e.item
        head, _, _ = it.prompt.rpartition(f" {it.subject} ")
        # Swap the repeated name (S2) for the indirect object: "..., Mary gave" -> answer John.
        corrupt_prompt = it.prompt.replace(f" {it.subject} ", f" {it.answer} ")
        corrupt_prompt = corrupt_prompt.replace(f" {it.answer} ", f" {it.subject} ", 1)
        if not head:
            continue
        if corrupt_prompt.count(f" {it.answer} ") != 1:
            corrupt_prompt = it.prompt[::-1].replace(
                f" {it.subject} "[::-1], f" {it.answer} "[::-1], 1
            )[::-1]
        corrupt_item = Item("ioi", it.template, it.answer, corrupt_prompt, it.subject)
        (corrupt,) = encode_items(tok, [corrupt_item])
        if len(corrupt.prompt_ids) != len(e.prompt_ids):
            continue
        diff = differing_positions(e.prompt_ids, corrupt.prompt_ids)
        if len(diff) != 1:
            continue
        yield Candidate("ioi", it.template, e, corrupt, 1)
