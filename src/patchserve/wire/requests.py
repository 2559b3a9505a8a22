"""Request bodies (pydantic, torch-free). Field names follow the seed server's wire format.

Hook and metric names are enums in the schema; every number that reaches the
model is finite and representable in float32 (``alpha: 1e39`` is a 400, not a
silent ``inf``). Every route's body is a ``RequestBody``: no string in it,
key or value, at any depth, holds a lone surrogate (JSON allows ``"\\ud800"``;
no tokenizer or encoder does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    model_validator,
)
from pydantic_core import PydanticCustomError

from patchserve.wire.hooks import HOOKS, METRICS

FLOAT32_MAX = 3.4028234663852886e38

HookName = Literal[HOOKS]  # type: ignore[valid-type]
MetricName = Literal[METRICS]  # type: ignore[valid-type]
SweepMethod = Literal["exact", "attribution", "attribution+verify"]


def _float32(value: int | float) -> int | float:
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError("must be a finite number within float32 range") from None
    if not math.isfinite(as_float) or abs(as_float) > FLOAT32_MAX:
        raise ValueError("must be a finite number within float32 range")
    return value


Number = Annotated[StrictInt | StrictFloat, AfterValidator(_float32)]


class Strict(BaseModel):
    """patchserve's own bodies: an unknown field is a 400 (a typo is never ignored)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


_SURROGATE = re.compile("[\ud800-\udfff]")


def find_lone_surrogate(value: Any, where: str = "") -> tuple[str, str] | None:
    """``(param, what)`` of the first string holding a lone surrogate: its path
    (``patch.0.source_run``) and how to name it in a message."""
    if isinstance(value, str):
        return (where, where or "the body") if _SURROGATE.search(value) else None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return where, f"a key of {where or 'the body'} ({key!a})"
        found = find_lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class RequestBody(BaseModel):
    """A route's whole body, checked once (nested models are part of it) for lone
    surrogates before any field is validated."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "{what} holds a lone surrogate (an unpaired \\ud800-\\udfff escape); "
                "send valid Unicode text",
                {"param": found[0], "what": found[1]},
            )
        return data


class SpanPosition(Strict):
    """The tokens of the prompt that a substring covers."""

    span: str
    """The substring of the prompt (matched exactly, case-sensitive)."""
    occurrence: StrictInt = 0
    """Which match, 0-based, when the substring occurs more than once."""


class LayerRange(Strict):
    """Layers ``start, start + step, ...`` below ``stop``."""

    start: StrictInt = 0
    """First layer."""
    stop: StrictInt | None = None
    """One past the last layer (default: the number of layers)."""
    step: StrictInt = 1
    """Stride."""


class PackedVectors(Strict):
    """A ``[rows, width]`` float tensor: little-endian, C-contiguous bytes in base64."""

    dtype: Literal["float32", "float16", "bfloat16"]
    """Element type of ``data``."""
    shape: list[StrictInt]
    """``[rows, width]``; ``width`` must equal the hook's width."""
    data: str
    """Base64 of the bytes."""


class MaskSpec(Strict):
    """Which dimensions a patch writes: a list of indices, or a row of ``patch_vectors``
    holding per-dimension weights in [0, 1]."""

    indices: list[StrictInt] | None = None
    """Dimensions written (the others keep the destination's value)."""
    inline: StrictInt | None = None
    """Row of ``patch_vectors`` with a weight in [0, 1] per dimension."""


MAX_NOISE_SAMPLES = 256


class NoiseCorruption(Strict):
    """ROME's corruption: Gaussian noise on the subject's token embeddings (``prompt`` is
    then the clean prompt, and the clean run is patched into its noised copies)."""

    type: Literal["noise"]
    span: str | list[StrictInt]
    """The subject: a substring of the prompt, or token positions (negative from the end)."""
    occurrence: StrictInt = 0
    """Which match of the substring, 0-based."""
    scale: Number = Field(3.0, gt=0)
    """Noise standard deviation in units of the embedding matrix's standard deviation."""
    samples: StrictInt = Field(10, ge=1, le=MAX_NOISE_SAMPLES)
    """Noise draws; each cell reports the mean over them (and its standard error)."""
    seed: StrictInt = Field(0, ge=0, le=2**62)
    """Sample ``s`` draws from a CPU generator seeded ``seed + s``: same seed, same grid."""


class ReplaceCorruption(Strict):
    """The two-prompt corruption: ``prompt`` is the clean prompt, this the corrupt one."""

    type: Literal["replace"]
    prompt: str
    """The corrupt prompt."""


Corruption = Annotated[NoiseCorruption | ReplaceCorruption, Field(discriminator="type")]


class PatchSweepRequest(Strict, RequestBody):
    """One study: patch the source into ``prompt`` over hooks × layers × positions and grade."""

    prompt: str
    """The corrupt (destination) prompt."""
    clean_prompt: str | None = None
    """The clean prompt: captured in this call when ``source_run`` is missing or not given."""
    source_run: str | None = None
    """A stored clean run to patch from."""
    source_module: str | None = None
    """A registered vector module (``zeros`` is built in): an ablation sweep."""
    source_inline: StrictInt | None = None
    """A row of ``patch_vectors`` to write at every cell: an ablation sweep."""
    patch_vectors: PackedVectors | None = None
    """The rows ``source_inline`` and ``mask.inline`` refer to."""
    mask: MaskSpec | None = None
    """Restrict every patch to some dimensions."""
    hook: HookName | None = None
    """The hook to sweep (default ``post_block``)."""
    hooks: list[HookName] | None = None
    """Several hooks at once (wins over ``hook``; the body then has ``hook_grids``)."""
    layers: list[StrictInt] | LayerRange | Literal["all"] | None = None
    """Layers to sweep (default all)."""
    positions: Literal["all_prompt"] | list[StrictInt | SpanPosition] = "all_prompt"
    """Positions to sweep: ints (negative from the end) and spans, in order."""
    heads: list[StrictInt] | Literal["all"] | None = None
    """Query heads, for ``attn_head`` only (default all)."""
    per_position: bool | None = None
    """``attn_head`` only. ``false``: one cell per (layer, head), patching that head at every
    selected position at once (grid ``[layer][head]``); ``true`` (default): one cell per
    (layer, position, head)."""
    alpha: Number = 1.0
    """Interpolation toward the source: ``(1 - alpha) * corrupt + alpha * source``."""
    answer_token: str | None = None
    """The graded answer, with its leading space (default: the clean top-1 token). Several
    tokens are a continuation graded by its teacher-forced total log-probability."""
    answer_token_id: StrictInt | list[StrictInt] | None = None
    """The graded token by id, or a continuation as a list of ids (wins over ``answer_token``)."""
    foil_token: str | None = None
    """A contrast: ``logit_diff`` and ``recovered`` use logit(answer) - logit(foil) (several
    tokens: the difference of the two total log-probabilities)."""
    foil_token_id: StrictInt | list[StrictInt] | None = None
    """The foil by id or list of ids (wins over ``foil_token``)."""
    metric: MetricName = "logprob"
    """What each cell reports (``kl``: lower = more restored)."""
    clean_baseline: Number | None = None
    """The clean metric value, for ``recovered`` when no clean run is graded."""
    keep_source: bool = False
    """Keep an auto-captured clean run after the sweep."""
    stream: bool = False
    """Answer with Server-Sent Events: start, cell..., summary (= the body), [DONE]."""
    logprobs: StrictInt = Field(20, ge=0, le=100)
    """How many next-token candidates the baselines list."""
    model: str | None = None
    """The served model's name (an unknown one is a 404); optional."""
    corruption: Corruption | None = None
    """How the corrupt run is made (``prompt`` is then the clean prompt): ``noise`` on a
    span's embeddings, or ``replace`` by a second prompt (= ``clean_prompt`` + ``prompt``)."""
    window: StrictInt = Field(1, ge=1)
    """Each cell at layer ``l`` restores layers ``l - window//2 .. l + (window-1)//2``
    (clipped) at its position at once, as ROME's traces do."""
    method: SweepMethod = "exact"
    """``attribution``: a first-order estimate of every cell from one backward pass;
    ``attribution+verify``: those estimates with the top ``verify_top_k`` cells exact."""
    verify_top_k: StrictInt | None = None
    """How many of the largest estimated cells ``attribution+verify`` computes exactly
    (default 10), each equal bit for bit to the exact sweep's value."""


class PatchSourceRequest(Strict, RequestBody):
    """Capture and store a clean run."""

    run: str | None = None
    """Its name (default: a fresh one); letters, digits, ``.``, ``_``, ``-``."""
    prompt: str
    """The clean prompt."""
    hooks: dict[HookName, list[StrictInt] | Literal["all"]] | None = None
    """``{hook: layers}`` to capture (default: every hook at every layer)."""
    positions: Literal["all_prompt"] | list[StrictInt] = "all_prompt"
    """Positions to capture."""
    answer_token: str | None = None
    """Grade this token on the clean run (``graded`` in the answer)."""
    answer_token_id: StrictInt | None = None
    """The graded token by id."""
    foil_token: str | None = None
    """A contrast token for the graded logit difference."""
    foil_token_id: StrictInt | None = None
    """The foil by id."""
    overwrite: bool = False
    """Replace a run of the same name (else 409)."""
    logprobs: StrictInt = Field(20, ge=0, le=100)
    """How many next-token candidates the answer lists."""
    model: str | None = None
    """The served model's name; optional."""


class TokenizeRequest(RequestBody):
    """Tokenize a prompt as the sweeps do."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    prompt: str
    """The text."""
    add_special_tokens: bool = True
    """Add BOS (and the like) as the model expects."""
    model: str | None = None
    """The served model's name; optional."""


class DetokenizeRequest(RequestBody):
    """Decode token ids to text."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    tokens: list[StrictInt]
    """Token ids."""
    model: str | None = None
    """The served model's name; optional."""


class ModuleVector(Strict):
    """One vector of a module."""

    vector: list[Number] | PackedVectors
    """The values (the hook's width), as a list or packed (one row)."""
    scale: Number = 1.0
    """Multiplies the vector."""


class RegisterModuleRequest(Strict, RequestBody):
    """Register named vectors for ablation sweeps and steering."""

    name: str
    """The module's name."""
    vectors: dict[HookName, dict[str, ModuleVector]]
    """``{hook: {layer: vector}}``."""
    overwrite: bool = False
    """Replace a module of the same name (else 409)."""


class PatchEntry(Strict):
    """One activation written during a completion."""

    layer: StrictInt
    """Layer of the site."""
    hook: HookName
    """Hook of the site."""
    dest_position: StrictInt
    """Absolute position written; past the prompt it addresses a generated token."""
    head: StrictInt | None = None
    """Query head, for ``attn_head`` only."""
    source_run: str | None = None
    """A stored run to read the value from (with ``source_position``)."""
    source_position: StrictInt | None = None
    """Position in ``source_run``."""
    source_module: str | None = None
    """A registered module's vector instead."""
    source_inline: StrictInt | None = None
    """A row of ``patch_vectors`` instead."""
    alpha: Number = 1.0
    """Interpolation toward the source."""
    mask: MaskSpec | None = None
    """Restrict the write to some dimensions."""


class SteerEntry(Strict):
    """An additive vector at every position of a site."""

    layer: StrictInt
    """Layer of the site."""
    hook: HookName
    """Hook of the site."""
    source_module: str | None = None
    """A registered module's vector."""
    source_inline: StrictInt | None = None
    """A row of ``patch_vectors``."""
    scale: Number = 1.0
    """Multiplies the vector."""
    head: StrictInt | None = None
    """Query head, for ``attn_head`` only."""


class CaptureSpec(Strict):
    """Store the prompt's run while completing it."""

    run: str | None = None
    """Its name (default: a fresh one)."""
    hooks: dict[HookName, list[StrictInt] | Literal["all"]] | None = None
    """``{hook: layers}`` to capture (default all)."""
    positions: Literal["all_prompt"] | list[StrictInt] = "all_prompt"
    """Positions to capture."""
    overwrite: bool = False
    """Replace a run of the same name (else 409)."""


class CaptureRequest(Strict):
    """The seed's ``capture`` object."""

    patch_source: CaptureSpec
    """What to capture."""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    include_usage: bool = False
    """Send a last chunk (no choices) with the request's usage."""


class Interventions(RequestBody):
    """The patchserve extras shared by /v1/completions and /v1/chat/completions."""

    # OpenAI clients send fields we do not use: those are ignored here.
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    model: str | None = None
    """The served model's name (an unknown one is a 404); optional."""
    max_tokens: StrictInt | None = 16
    """Tokens to generate."""
    temperature: Number = 1.0
    """Sampling temperature (0: greedy)."""
    top_p: Number = 1.0
    """Nucleus sampling mass."""
    seed: StrictInt | None = None
    """Sampling seed (reproducible per request)."""
    stop: str | list[str] | None = None
    """Stop strings."""
    logprobs: Any = None
    """Top-k log-probabilities per generated token (chat: a boolean with ``top_logprobs``)."""
    patch: list[PatchEntry] = Field(default_factory=list)
    """Activations written while generating."""
    patch_vectors: PackedVectors | None = None
    """The rows ``source_inline`` and ``mask.inline`` refer to."""
    steer: list[SteerEntry] = Field(default_factory=list)
    """Additive vectors at every position."""
    capture: CaptureRequest | None = None
    """Store the prompt's run."""
    capture_wait: bool = True
    """Accepted for the seed's clients (captures are always complete when answered)."""
    logprob_token_ids: list[StrictInt] = Field(default_factory=list)
    """Exact log-probabilities of these ids at every generated token (with ``logprobs`` set,
    they are what ``top_logprobs`` lists, as in the seed)."""
    n: StrictInt = 1
    """Completions per prompt (sharing the prompt's prefill); sample ``j`` draws with the
    seed ``seed + j``."""
    stream: bool = False
    """Stream OpenAI's chunks as Server-Sent Events (``data: {...}``, then ``data: [DONE]``)."""
    stream_options: StreamOptions | None = None
    """With ``stream``: ``include_usage`` adds a last chunk with the usage."""


class CompletionRequest(Interventions):
    """OpenAI's legacy completions, with patchserve's interventions."""

    prompt: str | list[str]
    """One prompt or a list (one choice each)."""
    echo: bool = False
    """Prefix the prompt (and its log-probabilities) to each choice."""
    best_of: StrictInt | None = None
    """Samples per prompt (>= ``n``); the ``n`` with the highest mean log-probability per
    token are returned."""


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    role: str
    """``system``, ``user`` or ``assistant``."""
    content: str
    """The message text."""


class ChatCompletionRequest(Interventions):
    """OpenAI's chat completions (the model's chat template), with the interventions."""

    messages: list[ChatMessage]
    """The conversation; positions of patches index the templated prompt."""
    top_logprobs: StrictInt | None = None
    """With ``logprobs: true``: candidates per generated token."""
