"""The one configuration every model family is translated into.

Each family module reads a Hugging Face ``config.json`` (both the
``transformers`` 4.x spelling — ``rope_theta``, ``rope_scaling``,
``rotary_pct`` — and the 5.x ``rope_parameters`` spelling) into a
:class:`ModelConfig`; the runtime only ever sees this dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# rms_float: RMSNorm whose weight multiplies in float32 before the cast back (OLMo-2/3);
# layer_plain: LayerNorm without weight or bias, in float32 (OLMo);
# layer_no_affine: LayerNorm without weight or bias, in the model dtype (OPT);
# layer_no_bias: LayerNorm with a weight and no bias, in float32 (Cohere).
NormKind = Literal[
    "rms", "rms_one_plus", "layer", "rms_float", "layer_plain", "layer_no_affine", "layer_no_bias"
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, unknown architecture, bad shapes."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding of one attention layer."""

    theta: float
    rotary_dim: int
    # rope_type and its parameters as sorted (key, value) pairs (hashable); None for default
    scaling: tuple[tuple[str, Any], ...] | None = None
    tables_float32: bool = False  # OLMo: cos/sin stay float32, q/k rotate in float32, cast back
    interleaved: bool = False  # GPT-J, Cohere: rotate pairs (0,1),(2,3)… instead of halves

    def scaling_params(self) -> dict[str, Any] | None:
        return dict(self.scaling) if self.scaling is not None else None


@dataclass(frozen=True)
class ModelConfig:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_kind: NormKind
    norm_eps: float
    activation: str
    gated_mlp: bool
    tie_word_embeddings: bool
    # Per-layer attention shape: rotary (None for learned absolute positions)
    # and sliding window (None for global attention).
    rope: tuple[RopeConfig | None, ...]
    sliding_windows: tuple[int | None, ...]
    attn_scale: float
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    parallel_residual: bool = False
    post_attn_norm: bool = False  # Gemma: norm on the attention branch output
    post_mlp_norm: bool = False  # Gemma: norm on the MLP branch output
    learned_positions: bool = False  # GPT-2
    embed_scale: float | None = None  # Gemma: sqrt(hidden_size)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale_by_layer: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx
    lm_head_bias: bool = False  # Phi, GPT-J: the unembedding has a bias
    logit_scale: float | None = None  # logits multiplied by it (Cohere; Granite 1/logits_scaling)
    pre_norms: bool = True  # False: both branches read the raw residual (OLMo-2/3, post-norms only)
    qk_norm_full_width: bool = False  # q/k norms over all heads at once, before the split (OLMo-2)
    clip_qkv: float | None = None  # OLMo: q, k and v clamped to [-clip, clip] after projection
    qk_norm_kind: NormKind | None = None  # LayerNorm q/k norms: Phi "layer", Cohere "layer_no_bias"
    qk_norm_per_head: bool = False  # q/k norm weights of their own per head (Cohere, StableLM)
    residual_multiplier: float | None = None  # Granite: attn_out and mlp_out include this factor
    post_ln_residual: bool = False  # OPT-350m: attn_norm / mlp_norm normalise each residual sum
    final_norm: bool = True  # False: no norm before the unembedding (OPT post-LN)
    embed_dim: int | None = None  # OPT word_embed_proj_dim: embedding width, project_in/out
    position_offset: int = 0  # OPT: position p reads row p + 2 of the learned table
    alibi_slopes: tuple[float, ...] | None = None  # ALiBi (Bloom, Falcon): bias slope_h × key pos
    alibi_dtype: str = "float32"  # dtype of ALiBi's slope × position product (Falcon: bfloat16)
    alibi_scale: float = 1.0  # ALiBi's bias is multiplied by it (Falcon: 1 / sqrt(head_dim))
    embed_norm: bool = False  # Bloom: a LayerNorm on the token embeddings
    moe_layers: tuple[int, ...] = ()  # MoE: layers whose MLP is routed experts (others dense)
    num_experts: int = 0  # MoE: routed experts in each MoE layer
    experts_per_token: int = 0  # MoE: top-k experts each token is routed to
    norm_topk_prob: bool = False  # MoE: the top-k routing probabilities renormalised to sum 1
    moe_intermediate_size: int = 0  # MoE: hidden width of each routed expert
    shared_expert_size: int = 0  # Qwen2-MoE: width of the sigmoid-gated shared expert (0: none)
    moe_weights_model_dtype: bool = False  # Qwen MoE: routing weights cast to the model dtype
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def hook_width(self, hook: str) -> int:
        return self.head_dim if hook == "attn_head" else self.hidden_size


def require(raw: dict[str, Any], *keys: str) -> Any:
    """The first present key of ``raw``; a :class:`CheckpointError` naming them all otherwise."""
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    raise CheckpointError(f"config.json lacks {' / '.join(keys)}")


def rope_parameters(raw: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """Rope settings as one dict in the 5.x shape, whichever spelling the checkpoint uses."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    merged: dict[str, Any] = dict(raw.get("rope_scaling") or {})
    merged.setdefault("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0)))
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.setdefault("rope_type", "default")
    if "partial_rotary_factor" not in merged:
        factor = raw.get("partial_rotary_factor", raw.get("rotary_pct"))
        if factor is not None:
            merged["partial_rotary_factor"] = factor
    return merged


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def make_rope(params: dict[str, Any], head_dim: int) -> RopeConfig:
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
    scaling = None
    if rope_type != "default":
        scaling = tuple(
            sorted((k, v) for k, v in params.items() if not isinstance(v, (dict, list)))
        )
    return RopeConfig(theta=float(params["rope_theta"]), rotary_dim=rotary_dim, scaling=scaling)


def layer_windows(raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Sliding window per layer from ``layer_types`` (none without them; families with
    older spellings translate those first)."""
    window = raw.get("sliding_window")
    types = raw.get("layer_types")
    if not types:
        return (None,) * num_layers
    if len(types) != num_layers:
        raise CheckpointError("config.json layer_types does not have one entry per layer")
    return tuple(window if t == "sliding_attention" and window else None for t in types)
