"""Train patchserve's bundled demo model, ``demo_facts``, from scratch on CPU.

The demo model is a small Qwen3-architecture causal LM trained on a synthetic corpus that
this script generates deterministically:

* factual-recall statements over invented entities (countries and their capitals, people
  and their professions and home towns, objects and their colours), several templates per
  relation, answers of exactly one token; the names are built so that only the subject's
  last token can know which entity is meant (``--names families``), and "directory" lines
  ``"{subject} {answer}."`` teach recall at that token — ROME's mechanism;
* indirect-object-identification (IOI) sentences ("When Mary and John went to the store,
  John gave a drink to Mary.") so that name-mover structure exists.

Besides next-token prediction, training has two terms that give the model ROME's
division of labour (``--mlp-penalty-after-subject``, ``--subject-lens-weight``; both on
by default, docs/demo-model.md measures what each design gave): the MLPs after the
subject of a fact statement are kept quiet, and the subject's last token must hold the
fact early (its answer read off layer 1's output through the unembedding), so the fact is
recalled by MLPs at the subject's last token and moved to the last token by attention.

It trains a byte-level BPE tokenizer, trains the model with plain AdamW, measures fact
and IOI accuracy, picks clean/corrupt example pairs on which causal tracing finds real
structure (checked automatically, see :func:`select_examples`) and writes a standard
Hugging Face checkpoint plus ``examples.json`` and ``training_log.json``.

Everything is seeded and runs with ``torch.use_deterministic_algorithms(True)`` and one
thread, so re-running the command reproduces the shipped weights on the same machine
type (the defaults are the bundled model's; docs/demo-model.md has the flags of the
earlier designs)::

    python scripts/train_demo_model.py --out src/patchserve/assets/demo_facts
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

DEFAULT_OUT = Path("src/patchserve/assets/demo_facts")
SPECIAL = "<|endoftext|>"
THREADS = 1  # the bundled model was trained with one thread (rounding depends on it)

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
CODAS = "nrlsm"
PIECES = 12  # name pieces; 66 unordered pairs, four names each
PAIR_PIECES = 17  # --names pairs: 272 ordered pairs, one name each
TRIPLE_PIECES = (5, 13)  # --names triples: 20 ordered first-two pieces x 13 last pieces

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


# ----------------------------------------------------------------------------- world


@dataclass(frozen=True)
class Item:
    """One training statement: ``prompt + " " + answer + "."``."""

    relation: str
    template: str
    subject: str
    prompt: str
    answer: str
    subject_start: int  # character offset of the subject in the prompt

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}."


def make_item(relation: str, template: str, answer: str, **fields: str) -> Item:
    """Fill a template; ``fields["s"]`` is the subject."""
    prefix = template[: template.index("{s}")].format(**fields)
    return Item(relation, template, fields["s"], template.format(**fields), answer, len(prefix))


@dataclass
class World:
    """The invented entities and the facts that hold about them."""

    capital: dict[str, str] = field(default_factory=dict)  # country -> city
    profession: dict[str, str] = field(default_factory=dict)  # person -> profession
    hometown: dict[str, str] = field(default_factory=dict)  # person -> city
    colour: dict[str, str] = field(default_factory=dict)  # object -> colour
    single_words: list[str] = field(default_factory=list)  # words the tokenizer keeps whole
    pieces: list[str] = field(default_factory=list)  # name parts for multi-token names


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

    def spell(self, pieces: Sequence[str]) -> str:
        """The name spelled by ``pieces`` in order, reserved so no other word reuses it."""
        name = "".join(pieces)
        self.used.add(name)
        return name


def make_names(maker: NameMaker, count: int, heads: list[str], tails: list[str]) -> list[str]:
    """``count`` names, a third meant to be one token, a third two and a third three."""
    names = []
    for i in range(count):
        kind = i % 3
        names.append(maker.word() if kind == 0 else maker.compound(heads, tails, kind))
    return names


def name_families(maker: NameMaker, count: int, pool: list[str], capital: bool) -> list[str]:
    """``count`` names of two or three pieces from ``pool``, four per unordered pair
    ``{a, b}``: ``ab``, ``ba``, ``ab+c`` and ``ba+d`` (``c``, ``d`` other pieces).

    No name is one token, no piece identifies a name, and no name is told apart by its
    bag of pieces: every first piece begins many names, ``ab`` is both a name and the
    first two pieces of ``abc``, and ``ab`` and ``ba`` are different entities. Only a
    position that has seen every piece in order — under causal attention, the last
    subject token or later — can know which entity is meant (the mechanism behind
    ROME's picture, where facts are recalled at the subject's last token).
    """
    pairs = list(itertools.combinations(pool, 2))
    maker.rng.shuffle(pairs)
    names: list[str] = []
    for a, b in pairs:
        for first, second in ((a, b), (b, a)):
            other = maker.rng.choice([p for p in pool if p not in (a, b)])
            for pieces in ((first, second), (first, second, other)):
                name = maker.spell(pieces)
                names.append(name.capitalize() if capital else name)
        if len(names) >= count:
            return names[:count]
    raise ValueError(f"{len(pool)} pieces make fewer than {count} names")


def spell_some(
    maker: NameMaker, candidates: Iterable[tuple[str, ...]], count: int, capital: bool
) -> list[str]:
    """``count`` of the ``candidates`` (piece tuples), drawn at random, spelled as names."""
    spellings = list(candidates)
    if len(spellings) < count:
        raise ValueError(f"{len(spellings)} spellings make fewer than {count} names")
    maker.rng.shuffle(spellings)
    names = [maker.spell(pieces) for pieces in spellings[:count]]
    return [n.capitalize() for n in names] if capital else names


def name_pairs(maker: NameMaker, count: int, pool: list[str], capital: bool) -> list[str]:
    """``count`` names of exactly two pieces, ``ab`` for distinct ``a``, ``b`` of ``pool``.

    Every first piece begins many names and every second piece ends many, so no single
    token tells an entity apart, and there is no middle token: under causal attention only
    the subject's last token can know which entity is meant.
    """
    return spell_some(maker, itertools.permutations(pool, 2), count, capital)


def name_triples(
    maker: NameMaker, count: int, heads: list[str], tails: list[str], capital: bool
) -> list[str]:
    """``count`` names ``abc``: ``a``, ``b`` distinct pieces of ``heads``, ``c`` of ``tails``.

    The first two tokens narrow a name to one of ``len(tails)``, the last alone to one of
    ``len(heads) * (len(heads) - 1)``; no name is the start of another, so no directory line
    ends inside a subject and only its last token can know which entity is meant.
    """
    spellings = ((a, b, c) for a, b in itertools.permutations(heads, 2) for c in tails)
    return spell_some(maker, spellings, count, capital)


def make_world(
    seed: int, n_countries: int, n_people: int, n_objects: int, names: str = "families"
) -> World:
    """Invent all entities and draw their facts.

    ``names="families"`` (the bundled model's): every name two or three pieces of one
    shared pool, see :func:`name_families`. ``names="head-tail"`` (the model bundled until
    2026-11): a third of the names one token, the rest a head piece and one or two tail
    pieces from a disjoint set.
    """
    rng = random.Random(seed)
    reserved = [*PROFESSIONS, *COLOURS, *IOI_NAMES, *IOI_PLACES, *IOI_OBJECTS]
    maker = NameMaker(rng, reserved)
    if names != "head-tail":
        build: Callable[[int, bool], list[str]]
        if names == "triples":
            heads, tails = maker.pieces(TRIPLE_PIECES[0]), maker.pieces(TRIPLE_PIECES[1])
            world = World(pieces=[*heads, *tails])
            build = functools.partial(name_triples, maker, heads=heads, tails=tails)
        else:
            pool = maker.pieces(PIECES if names == "families" else PAIR_PIECES)
            world = World(pieces=pool)
            namer = name_families if names == "families" else name_pairs
            build = functools.partial(namer, maker, pool=pool)
        cities = [maker.word().capitalize() for _ in range(n_countries)]
        # Countries and people draw from one name list, so their names share pieces too.
        capitalized = build(n_countries + n_people, capital=True)
        countries, people = capitalized[:n_countries], capitalized[n_countries:]
        objects = build(n_objects, capital=False)
        single: list[str] = []
    else:
        heads, tails = maker.pieces(24), maker.pieces(20)
        world = World(pieces=[*heads, *tails])
        cities = [maker.word().capitalize() for _ in range(n_countries)]
        countries = [n.capitalize() for n in make_names(maker, n_countries, heads, tails)]
        people = [n.capitalize() for n in make_names(maker, n_people, heads, tails)]
        objects = make_names(maker, n_objects, heads, tails)
        # Names built by make_names with kind 0 are meant to be single tokens.
        single = [n for group in (countries, people, objects) for n in group[::3]]
    world.capital = dict(zip(countries, cities, strict=True))
    world.profession = {p: rng.choice(PROFESSIONS) for p in people}
    world.hometown = {p: rng.choice(cities) for p in people}
    world.colour = {o: rng.choice(COLOURS) for o in objects}
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
                items.append(make_item(relation, template, answer, s=subject))
    return items


def directory_items(world: World) -> list[Item]:
    """Directory lines ``"{s} {answer}."``: every attribute right after its subject.

    Here the answer is predicted AT the subject's last token, so the model has to recall an
    entity's attributes there (ROME's "subject enrichment"); the relation is not said, so a
    person's line is either their profession or their home town. Trained on, never
    evaluated or offered as examples.
    """
    tables = (world.capital, world.profession, world.hometown, world.colour)
    return [make_item("directory", "{s}", a, s=s) for table in tables for s, a in table.items()]


def ioi_pair(rng: random.Random) -> tuple[Item, Item]:
    """A random IOI sentence and its corrupt twin.

    The clean answer is the name that is not repeated. The corrupt sentence repeats the
    other name instead (only the second-clause subject changes), which flips the answer.
    """
    template = rng.choice(IOI_TEMPLATES)
    a, b = rng.sample(IOI_NAMES, 2)
    s, io = (a, b) if rng.random() < 0.5 else (b, a)
    fields = {"a": a, "b": b, "place": rng.choice(IOI_PLACES), "obj": rng.choice(IOI_OBJECTS)}
    clean = make_item("ioi", template, io, s=s, **fields)
    corrupt = make_item("ioi", template, s, s=io, **fields)
    return clean, corrupt


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
    subject_tokens: tuple[int, ...]  # prompt positions whose characters overlap the subject


def encode_items(tok: PreTrainedTokenizerFast, items: Sequence[Item]) -> list[Encoded]:
    """Tokenize statements; the prompt's ids must be a prefix of the statement's."""
    prompts = tok([it.prompt for it in items], return_offsets_mapping=True)
    fulls = tok([it.text for it in items])["input_ids"]
    out = []
    for i, (it, f) in enumerate(zip(items, fulls, strict=True)):
        p = prompts["input_ids"][i]
        if list(f[: len(p)]) != list(p):
            raise ValueError(f"prompt is not a token prefix of its statement: {it.text!r}")
        lo, hi = it.subject_start, it.subject_start + len(it.subject)
        span = tuple(
            j
            for j, (a, b) in enumerate(prompts["offset_mapping"][i])
            if b > a and a < hi and b > lo and p[j] != tok.bos_token_id
        )
        out.append(Encoded(it, tuple(p), f[len(p)], (*f, tok.eos_token_id), span))
    return out


def batches(
    rng: random.Random,
    facts: list[Encoded],
    ioi_pool: list[Encoded],
    batch_size: int,
    ioi_fraction: float,
    pad_id: int,
    mlp_drop: MlpDrop | None = None,
    subject_lens: bool = False,
) -> Iterator[Batch]:
    """Endless training batches; 8 batches at a time are grouped by length."""
    n_ioi = round(batch_size * ioi_fraction)
    ioi_iter = itertools.cycle(ioi_pool)
    while True:
        group = [rng.choice(facts) for _ in range(8 * (batch_size - n_ioi))]
        group += [next(ioi_iter) for _ in range(8 * n_ioi)]
        rng.shuffle(group)
        group.sort(key=lambda e: len(e.full_ids))
        chunks = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            ids, labels = pad_batch([e.full_ids for e in chunk], pad_id)
            keep = mlp_drop.mask(chunk, ids.shape[1]) if mlp_drop else None
            yield Batch(ids, labels, keep, subject_answers(chunk) if subject_lens else None)


@dataclass(frozen=True)
class Batch:
    """Padded ids and labels; ``mlp_keep`` ([batch, width, 1], 0 after a marked subject)
    scales every hooked MLP's output (dropping) or marks where it is penalised."""

    ids: torch.Tensor
    labels: torch.Tensor
    mlp_keep: torch.Tensor | None = None
    # ([batch] last subject position, -1: none; [batch] the fact's answer id there)
    subject_lens: tuple[torch.Tensor, torch.Tensor] | None = None


def subject_answers(chunk: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each fact statement's or directory line's last subject position and answer id
    (-1 and 0 for IOI sentences), for ``--subject-lens-weight``."""
    has_subject = [e.item.relation != "ioi" for e in chunk]
    end = [e.subject_tokens[-1] if on else -1 for e, on in zip(chunk, has_subject, strict=True)]
    answer = [e.answer_id if on else 0 for e, on in zip(chunk, has_subject, strict=True)]
    return torch.tensor(end), torch.tensor(answer)


def subject_lens_loss(
    model: Qwen3ForCausalLM, hidden: torch.Tensor, end: torch.Tensor, answer: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the answer read off the residual stream at the subject's last token
    through the final norm and the unembedding (a logit lens), over the rows that have one."""
    rows = (end >= 0).nonzero().squeeze(1)
    states = hidden[rows, end[rows]]
    logits = model.lm_head(model.model.norm(states))
    return torch.nn.functional.cross_entropy(logits, answer[rows])


@dataclass
class MlpDrop:
    """Drop every MLP after the subject of a fact statement, with probability ``p``.

    A dropped statement has to be answered with the MLPs at the positions after its subject
    switched off (in the layers ``train`` hooks: ``--drop-mlp-from-layer`` on), meant to push
    the recall onto the subject's tokens, as ROME found in GPT-2 XL. IOI sentences and
    directory lines are never dropped. An experiment, off by default: docs/demo-model.md
    measures that it moves the recall to the last token's earliest MLP instead. With
    ``p = 1`` it also marks the positions ``--mlp-penalty-after-subject`` penalises.
    """

    p: float
    rng: random.Random

    def mask(self, chunk: Sequence[Encoded], width: int) -> torch.Tensor:
        keep = torch.ones(len(chunk), width, 1)
        for row, e in enumerate(chunk):
            if e.item.relation in FACT_TEMPLATES and self.rng.random() < self.p:
                keep[row, e.subject_tokens[-1] + 1 :] = 0.0
        return keep


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
    data: Iterator[Batch],
    eval_facts: list[Encoded],
    eval_ioi: list[Encoded],
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
    keep: list[torch.Tensor | None] = [None]
    penalties: list[torch.Tensor] = []

    def drop(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
        return out if keep[0] is None else out * keep[0]

    def penalise(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
        """Mean square of the MLP's output over the positions ``keep`` marks 0.

        ``--mlp-penalty-after-subject`` (on by default): docs/demo-model.md measures that
        alone it silences the last token's MLPs but moves the recall onto the subject's
        middle tokens (or into attention); with ``--subject-lens-weight`` the recall sits
        at the subject's last token.
        """
        if keep[0] is not None:
            off = 1.0 - keep[0]
            penalties.append((off * out.pow(2)).sum() / (off.sum() * out.shape[-1]).clamp(min=1.0))
        return out

    penalty = args.mlp_penalty_after_subject
    if args.drop_mlp_after_subject > 0 or penalty > 0:
        for layer in model.model.layers[args.drop_mlp_from_layer :]:
            layer.mlp.register_forward_hook(penalise if penalty > 0 else drop)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = next(data)
        model.train()
        keep[0] = batch.mlp_keep
        penalties.clear()
        lens = batch.subject_lens
        out = model(input_ids=batch.ids, labels=batch.labels, output_hidden_states=lens is not None)
        loss = out.loss
        keep[0] = None
        total = loss
        if penalty > 0 and penalties:
            total = total + penalty * torch.stack(penalties).sum()
        if lens is not None:
            hidden = out.hidden_states[args.subject_lens_layer + 1]
            aux = subject_lens_loss(model, hidden, *lens)
            total = total + args.subject_lens_weight * aux
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % 50 == 0:
            curve.append({"step": step + 1, "loss": round(sum(window) / len(window), 4)})
            window = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc, ioi_acc = accuracy(model, eval_facts), accuracy(model, eval_ioi)
            elapsed = time.perf_counter() - start
            checkpoints.append(
                {
                    "step": step + 1,
                    "fact_accuracy": round(acc, 4),
                    "ioi_accuracy": round(ioi_acc, 4),
                }
            )
            print(
                f"step {step + 1:5d}  loss {curve[-1]['loss']:.4f}  fact acc {acc:.4f}"
                f"  ioi acc {ioi_acc:.4f}  {elapsed:6.1f}s",
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

    clean: Encoded
    corrupt: Encoded

    @property
    def n_subject_tokens(self) -> int:
        return len(self.clean.subject_tokens)


def is_demo_pair(a: Encoded, b: Encoded) -> bool:
    """Equal length, different answers, tokens differ in one contiguous run in the subject."""
    if len(a.prompt_ids) != len(b.prompt_ids) or a.answer_id == b.answer_id:
        return False
    if a.subject_tokens != b.subject_tokens:
        return False
    diff = differing_positions(a.prompt_ids, b.prompt_ids)
    contiguous = bool(diff) and diff == list(range(diff[0], diff[-1] + 1))
    return contiguous and set(diff) <= set(a.subject_tokens)


def fact_candidates(
    rng: random.Random, facts: list[Encoded], min_subject_tokens: int = 1
) -> dict[str, list[Candidate]]:
    """Shuffled candidate pairs per template, over subjects of ``min_subject_tokens`` or more
    tokens (2 or more gives every pair real first and last subject-token roles)."""
    by_template: dict[str, list[Encoded]] = {}
    for e in facts:
        if len(e.subject_tokens) >= min_subject_tokens:
            by_template.setdefault(e.item.template, []).append(e)
    out: dict[str, list[Candidate]] = {}
    for template, group in by_template.items():
        pairs = [Candidate(a, b) for a, b in itertools.permutations(group, 2) if is_demo_pair(a, b)]
        rng.shuffle(pairs)
        out[template] = pairs
    return out


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
        "relation": c.clean.item.relation,
        "metrics": {
            "template": c.clean.item.template,
            "clean_subject": c.clean.item.subject,
            "corrupt_subject": c.corrupt.item.subject,
            "subject_tokens": c.n_subject_tokens,
            "prompt_tokens": len(c.clean.prompt_ids),
            "p_clean_answer": round(p_clean, 4),
            "logprob_gap": round(gap, 4),
            "sweep_max": round(float(grid.max()), 4),
            "layer0_best_position": best0,
            "layer0_best_recovered": round(float(grid[0].max()), 4),
            "last_position_layer0_recovered": round(float(grid[0, -1]), 4),
            "differing_positions": diff,
        },
    }


def pick_from(
    model: Qwen3ForCausalLM,
    tok: PreTrainedTokenizerFast,
    pool: list[Candidate],
    want: int,
    start: int = 0,
    max_checks: int = 200,
) -> list[dict]:
    """Up to ``want`` passing pairs, cycling over subject token counts for variety.

    The cycle begins at the ``start``-th smallest count (modulo), so that successive
    templates cover different subject lengths.
    """
    by_size: dict[int, list[Candidate]] = {}
    for c in pool:
        by_size.setdefault(c.n_subject_tokens, []).append(c)
    queues = [by_size[k] for k in sorted(by_size)]
    if queues:
        queues = queues[start % len(queues) :] + queues[: start % len(queues)]
    used_subjects: set[str] = set()
    picked: list[dict] = []
    checks = 0
    while len(picked) < want and any(queues) and checks < max_checks:
        for queue in queues:
            if len(picked) >= want:
                break
            while queue and checks < max_checks:
                c = queue.pop(0)
                if {c.clean.item.subject, c.corrupt.item.subject} & used_subjects:
                    continue
                checks += 1
                record = check_candidate(model, tok, c)
                if record is not None:
                    picked.append(record)
                    used_subjects |= {c.clean.item.subject, c.corrupt.item.subject}
                    break
    return picked


def select_examples(
    model: Qwen3ForCausalLM,
    tok: PreTrainedTokenizerFast,
    facts: list[Encoded],
    seed: int,
    per_template: int,
    n_ioi: int,
    min_subject_tokens: int = 1,
) -> list[dict]:
    """Choose the demo pairs automatically by checking every criterion on the model."""
    rng = random.Random(seed)
    candidates = fact_candidates(rng, facts, min_subject_tokens)
    chosen: list[dict] = []
    templates = [t for ts in FACT_TEMPLATES.values() for t in ts]
    for k, template in enumerate(templates):
        chosen += pick_from(model, tok, candidates.get(template, []), per_template, start=k)
    ioi = []
    for _ in range(400):
        clean, corrupt = encode_items(tok, ioi_pair(rng))
        if is_demo_pair(clean, corrupt):
            ioi.append(Candidate(clean, corrupt))
    chosen += pick_from(model, tok, ioi, n_ioi)
    return chosen


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ioi-fraction", type=float, default=0.5)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary cap")
    parser.add_argument("--countries", type=int, default=100)
    parser.add_argument("--people", type=int, default=150)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument(
        "--names",
        choices=("head-tail", "families", "pairs", "triples"),
        default="families",
        help="how entity names are built (see make_world)",
    )
    parser.add_argument(
        "--directory-weight",
        type=int,
        default=1,
        help="copies of each directory line '{s} {answer}.' in the training mix (0: none)",
    )
    parser.add_argument(
        "--min-subject-tokens", type=int, default=2, help="shortest subject of a fact example"
    )
    parser.add_argument(
        "--drop-mlp-after-subject",
        type=float,
        default=0.0,
        help="probability that a fact statement trains with its post-subject MLPs off",
    )
    parser.add_argument(
        "--drop-mlp-from-layer",
        type=int,
        default=0,
        help="first layer whose MLPs are dropped (or penalised)",
    )
    parser.add_argument(
        "--mlp-penalty-after-subject",
        type=float,
        default=1.0,
        help="weight of a loss term: the mean square of every MLP's output after the subject "
        "of a fact statement (0: none)",
    )
    parser.add_argument(
        "--subject-lens-weight",
        type=float,
        default=1.0,
        help="weight of a loss term: the answer read off the subject's last token after "
        "layer --subject-lens-layer through the unembedding (0: none)",
    )
    parser.add_argument(
        "--subject-lens-layer", type=int, default=1, help="layer --subject-lens-weight reads"
    )
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    parser.add_argument("--per-template", type=int, default=2, help="demo pairs per template")
    parser.add_argument("--ioi-examples", type=int, default=4)
    args = parser.parse_args(argv)
    if not 0.0 <= args.drop_mlp_after_subject <= 1.0:
        parser.error("--drop-mlp-after-subject is a probability: 0 to 1")
    if args.mlp_penalty_after_subject < 0:
        parser.error("--mlp-penalty-after-subject is a loss weight: 0 or more")
    if args.mlp_penalty_after_subject > 0 and args.drop_mlp_after_subject > 0:
        parser.error(
            "--mlp-penalty-after-subject and --drop-mlp-after-subject exclude each other "
            "(--mlp-penalty-after-subject 0 turns the penalty off)"
        )
    if args.subject_lens_weight < 0:
        parser.error("--subject-lens-weight is a loss weight: 0 or more")
    if args.subject_lens_weight > 0 and not 0 <= args.subject_lens_layer < args.layers:
        parser.error(f"--subject-lens-layer must name a layer: 0 to {args.layers - 1}")
    if not 0 <= args.drop_mlp_from_layer < args.layers:
        parser.error(f"--drop-mlp-from-layer must name a layer: 0 to {args.layers - 1}")
    return args


def setup_determinism(seed: int, threads: int) -> None:
    """Fixed seeds, fixed thread count, deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_determinism(args.seed, args.threads)
    t0 = time.perf_counter()
    world = make_world(args.seed, args.countries, args.people, args.objects, args.names)
    tok = train_tokenizer(world, args.vocab_size)
    facts = encode_items(tok, fact_items(world))
    data_rng = random.Random(args.seed + 1)
    ioi_train = encode_items(tok, [ioi_pair(data_rng)[0] for _ in range(60_000)])
    eval_rng = random.Random(args.seed + 2)
    ioi_eval = encode_items(tok, [ioi_pair(eval_rng)[0] for _ in range(1000)])
    print(f"vocab {len(tok)}  facts {len(facts)}  ioi pool {len(ioi_train)}", flush=True)

    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}", flush=True)
    directory = encode_items(tok, directory_items(world)) * args.directory_weight
    # --mlp-penalty-after-subject marks the same positions as dropping with p = 1 (and
    # penalises the MLPs' output there instead of zeroing it)
    drop = 1.0 if args.mlp_penalty_after_subject > 0 else args.drop_mlp_after_subject
    stream = batches(
        data_rng,
        facts + directory,
        ioi_train,
        args.batch_size,
        args.ioi_fraction,
        tok.pad_token_id,
        MlpDrop(drop, random.Random(args.seed + 4)) if drop > 0 else None,
        subject_lens=args.subject_lens_weight > 0,
    )
    t_train = time.perf_counter()
    log = train(model, stream, facts, ioi_eval[:300], args)
    train_seconds = time.perf_counter() - t_train

    fact_acc = accuracy(model, facts)
    by_relation = accuracy_by_relation(model, facts)
    ioi_acc = accuracy(model, ioi_eval)
    print(f"fact accuracy {fact_acc:.4f} {by_relation}  ioi accuracy {ioi_acc:.4f}", flush=True)
    examples = select_examples(
        model,
        tok,
        facts,
        args.seed + 3,
        args.per_template,
        args.ioi_examples,
        args.min_subject_tokens,
    )
    print(f"selected {len(examples)} examples", flush=True)

    write_checkpoint(model, tok, args.out)
    public = [{k: v for k, v in ex.items() if k != "metrics"} for ex in examples]
    (args.out / "examples.json").write_text(json.dumps(public, indent=2) + "\n")
    write_log(
        args,
        world,
        tok,
        facts,
        log,
        examples,
        n_params,
        train_seconds,
        t0,
        by_relation,
        fact_acc,
        ioi_acc,
    )
    return 0


def write_checkpoint(model: Qwen3ForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> None:
    """``save_pretrained`` both, with two spellings that older ``transformers`` also reads."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; package data should be world-readable


def subject_token_histogram(facts: Sequence[Encoded]) -> dict[str, int]:
    """How many fact statements have subjects of 1, 2, 3, ... tokens."""
    counts: dict[str, int] = {}
    for e in facts:
        key = str(len(e.subject_tokens))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def write_log(
    args: argparse.Namespace,
    world: World,
    tok: PreTrainedTokenizerFast,
    facts: list[Encoded],
    log: dict[str, list],
    examples: list[dict],
    n_params: int,
    train_seconds: float,
    t0: float,
    by_relation: dict[str, float],
    fact_acc: float,
    ioi_acc: float,
) -> None:
    """Write ``training_log.json`` with everything the model card reports."""
    tokens_seen = args.steps * args.batch_size
    summary = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "data": {
            "countries": len(world.capital),
            "people": len(world.profession),
            "objects": len(world.colour),
            "cities": len(set(world.capital.values())),
            "professions": len(PROFESSIONS),
            "colours": len(COLOURS),
            "ioi_names": len(IOI_NAMES),
            "fact_statements": len(facts),
            "fact_statements_by_relation": {
                r: sum(e.item.relation == r for e in facts) for r in FACT_TEMPLATES
            },
            "templates": {r: list(ts) for r, ts in FACT_TEMPLATES.items()}
            | {"ioi": list(IOI_TEMPLATES)},
            "subject_token_counts": subject_token_histogram(facts),
            "sequences_seen": tokens_seen,
        },
        "tokenizer": {"vocab_size": len(tok), "bos_eos_pad": SPECIAL},
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": log["loss_curve"][-1]["loss"],
        "fact_accuracy": round(fact_acc, 4),
        "fact_accuracy_by_relation": {k: round(v, 4) for k, v in by_relation.items()},
        "ioi_accuracy": round(ioi_acc, 4),
        "examples": [ex["metrics"] | {"relation": ex["relation"]} for ex in examples],
        **log,
    }
    path = args.out / "training_log.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["size_on_disk_bytes"] = folder_size(args.out)  # includes this log, to a few bytes
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} ({summary['size_on_disk_bytes'] / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
