"""Text generation with interventions: the engine behind ``/v1/completions`` (docs/api.md §2).

``types`` (requests and reports), ``validation`` (every check, before model
work), ``interventions`` (patches and steering per pass), ``cache`` (the
growing key/value cache), ``sampling``, ``text`` (detokenisation, stop
strings, chat templates) ``loop`` (:func:`generate`, one prompt), ``batch`` (the executor
and per-row post-processing), ``planner`` (pure: who joins, in which prefill passes),
``blockrows`` (the running rows' key/value block) and ``scheduler`` (continuous batching:
:class:`GenerationScheduler` decodes the rows of concurrent requests together;
:func:`generate_batch`, one request's prompts in the caller's thread). OpenAI's shapes are
the server's business (``patchserve.server.openai``).
"""

from patchserve.engine.generation.loop import generate
from patchserve.engine.generation.sampling import sample
from patchserve.engine.generation.scheduler import GenerationScheduler, generate_batch
from patchserve.engine.generation.text import apply_chat_template
from patchserve.engine.generation.types import (
    GenerationRequest,
    GenerationResult,
    ReportedTokens,
    SteerVector,
    TokenStep,
)
from patchserve.engine.generation.validation import validate_request

__all__ = [
    "GenerationRequest",
    "GenerationResult",
    "GenerationScheduler",
    "ReportedTokens",
    "SteerVector",
    "TokenStep",
    "apply_chat_template",
    "generate",
    "generate_batch",
    "sample",
    "validate_request",
]
