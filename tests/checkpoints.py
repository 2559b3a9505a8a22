"""Tiny random Hugging Face checkpoints of every supported family, built offline.

Each checkpoint is made with ``transformers`` (``from_config`` +
``save_pretrained``) next to a byte-level BPE tokenizer trained here with
``tokenizers``; nothing is downloaded. Norm weights and biases are randomised
too, so that a wrong name mapping cannot hide behind an all-ones weight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 320
CORPUS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "The Colosseum is in Rome, the capital of Italy.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Berlin is the capital of Germany and Madrid is the capital of Spain.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Activation patching finds which activations carry a behaviour.",
] * 20


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(folder: Path, add_bos: bool) -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 0)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CONFIGS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "llama": lambda: tf.LlamaConfig(
        **COMMON,
        **LLAMA_SHAPE,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_tied_bias": lambda: tf.LlamaConfig(
        **COMMON,
        **LLAMA_SHAPE,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "mistral": lambda: tf.MistralConfig(**COMMON, **LLAMA_SHAPE, sliding_window=16),
    "qwen2": lambda: tf.Qwen2Config(**COMMON, **LLAMA_SHAPE),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, **LLAMA_SHAPE, head_dim=32),
    "gpt2": lambda: tf.GPT2Config(**COMMON, n_embd=64, n_layer=3, n_head=4, n_positions=256),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        **COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=256,
    ),
    "gpt_neox_sequential": lambda: tf.GPTNeoXConfig(
        **COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        rotary_pct=0.5,
        use_parallel_residual=False,
        max_position_embeddings=256,
    ),
    "gemma2": lambda: tf.Gemma2Config(
        **COMMON,
        **LLAMA_SHAPE,
        head_dim=16,
        sliding_window=5,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": lambda: tf.Gemma3TextConfig(
        **COMMON,
        **{**LLAMA_SHAPE, "num_hidden_layers": 4},
        head_dim=16,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
    ),
    "gemma1": lambda: tf.GemmaConfig(**COMMON, **LLAMA_SHAPE, head_dim=16),
    "olmo": lambda: tf.OlmoConfig(**COMMON, **LLAMA_SHAPE, clip_qkv=1.5),
    "olmo2": lambda: tf.Olmo2Config(**COMMON, **LLAMA_SHAPE),
    "olmo3": lambda: tf.Olmo3Config(
        **COMMON,
        **LLAMA_SHAPE,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
    ),
    "gptj": lambda: tf.GPTJConfig(
        **COMMON, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_inner=128, n_positions=256
    ),
    "cohere": lambda: tf.CohereConfig(
        **COMMON, **LLAMA_SHAPE, use_qk_norm=True, logit_scale=0.5, attention_bias=True
    ),
    "phi": lambda: tf.PhiConfig(**COMMON, **LLAMA_SHAPE, partial_rotary_factor=0.5),
    "phi_qk_layernorm": lambda: tf.PhiConfig(
        **COMMON, **{**LLAMA_SHAPE, "num_key_value_heads": 4}, qk_layernorm=True
    ),
    "stablelm": lambda: tf.StableLmConfig(**COMMON, **LLAMA_SHAPE, use_qkv_bias=True),
    "stablelm_parallel_qk": lambda: tf.StableLmConfig(
        **COMMON,
        **LLAMA_SHAPE,
        partial_rotary_factor=0.5,
        use_parallel_residual=True,
        qk_layernorm=True,
    ),
    "phi3": lambda: tf.Phi3Config(
        **COMMON,
        **LLAMA_SHAPE,
        sliding_window=16,
        original_max_position_embeddings=64,  # the context: longer positions are refused
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.3, 2.0, 3.1, 5.0],
            "long_factor": [2.0, 4.0, 8.0, 16.0],
        },
    ),
    "granite": lambda: tf.GraniteConfig(
        **COMMON,
        **LLAMA_SHAPE,
        embedding_multiplier=3.3,
        residual_multiplier=0.6,
        attention_multiplier=0.1,
        logits_scaling=2.5,
    ),
    "smollm3": lambda: tf.SmolLM3Config(
        **COMMON,
        **{**LLAMA_SHAPE, "num_hidden_layers": 4},
        no_rope_layers=[1, 0, 1, 0],
        use_sliding_window=True,
        sliding_window=6,
    ),
    "starcoder2": lambda: tf.Starcoder2Config(
        **COMMON,
        **LLAMA_SHAPE,
        sliding_window=16,
    ),
    "gpt_neo": lambda: tf.GPTNeoConfig(
        **COMMON,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 1], [["local", "global"], 1]],
        window_size=5,
        max_position_embeddings=256,
    ),
    "opt": lambda: tf.OPTConfig(
        **COMMON,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
    ),
    "opt_post_ln": lambda: tf.OPTConfig(
        **COMMON,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        do_layer_norm_before=False,
    ),
    "bloom": lambda: tf.BloomConfig(**COMMON, hidden_size=72, n_layer=3, n_head=6),
    "falcon": lambda: tf.FalconConfig(
        **COMMON,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        bias=True,
        ffn_hidden_size=128,
        max_position_embeddings=256,
    ),
    "falcon_mq": lambda: tf.FalconConfig(
        **COMMON,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        ffn_hidden_size=128,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "falcon_alibi": lambda: tf.FalconConfig(
        **COMMON,
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=16,  # slopes 2^(-i/2): not exact in bfloat16
        alibi=True,
        multi_query=False,
        parallel_attn=False,
        bias=True,
        ffn_hidden_size=128,
        max_position_embeddings=256,
    ),
    # Mixture-of-experts: 4 experts, top-2, so that tokens are routed to different experts;
    # Mixtral renormalises the top-k, Qwen2-MoE not (and has dense layer 1), Qwen3-MoE does
    # (dense layers 0 and 2 by decoder_sparse_step). Widths are multiples of 64, as in real
    # checkpoints: the CPU's SIMD activation rounds a row alike wherever it sits.
    "mixtral": lambda: tf.MixtralConfig(
        **COMMON,
        **LLAMA_SHAPE,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
    ),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        **COMMON,
        **LLAMA_SHAPE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=192,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        **COMMON,
        **{**LLAMA_SHAPE, "num_hidden_layers": 4},
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        decoder_sparse_step=2,
    ),
}
#: Not in FAMILIES (no parity tests): a wide, deep model whose full capture of 256
#: tokens is ~200 MB, for the server's responsiveness tests.
EXTRA_CONFIGS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "qwen3_wide": lambda: tf.Qwen3Config(
        **COMMON,
        hidden_size=2048,
        intermediate_size=64,
        num_hidden_layers=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
    ),
    # the reduced Ray test of `make test` (tests/engine/test_replicas.py): two actors, 2 layers
    "qwen3_2layer": lambda: tf.Qwen3Config(
        **COMMON, **{**LLAMA_SHAPE, "num_hidden_layers": 2}, head_dim=32
    ),
}
ADDS_BOS = {"llama", "llama_tied_bias", "mistral", "gemma2", "gemma3", "gemma1", "mixtral"}
FAMILIES = tuple(CONFIGS)


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + 0.2 * noise)
            elif p.dim() == 2 and name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.2 * noise)  # Cohere's per-head q/k norms: [heads, head_dim]
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def build_checkpoint(family: str, root: Path, seed: int = 0) -> Path:
    """Save a random ``family`` checkpoint + tokenizer under ``root/family``; return the folder."""
    folder = root / family
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, add_bos=family in ADDS_BOS)
    config = {**CONFIGS, **EXTRA_CONFIGS}[family]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    randomise(model, seed)
    model.save_pretrained(folder)
    return folder


#: Where ``transformers`` keeps each family's decoder layers and the modules whose outputs are
#: our ``attn_out`` and ``mlp_out`` (dotted paths from a decoder layer), for the capture,
#: module-hook and steering checks. A family not named here uses the Llama layout.
REFERENCE_MODULES: dict[str, tuple[str, str, str]] = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "gemma": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma1": ("model.layers", "self_attn", "mlp"),  # not Gemma 2/3's post-norms
    "olmo2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo3": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gptj": ("transformer.h", "attn", "mlp"),
    "gpt_neo": ("transformer.h", "attn", "mlp"),
    "opt": ("model.decoder.layers", "self_attn", "fc2"),
    "bloom": ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h"),
    "falcon": ("transformer.h", "self_attention", "mlp"),
}
LLAMA_MODULES = ("model.layers", "self_attn", "mlp")
#: The config attribute of the factor our ``attn_out`` / ``mlp_out`` include but
#: ``transformers``' branch modules above do not (it scales them as they are added).
BRANCH_SCALES: dict[str, str] = {"granite": "residual_multiplier"}


def _path(root: object, dotted: str) -> object:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def reference_modules(ref: torch.nn.Module, family: str) -> tuple[list[torch.nn.Module], str, str]:
    """``transformers``' decoder layers of ``ref`` and the dotted paths (from a layer) of the
    modules whose outputs are ``attn_out`` and ``mlp_out``: the longest matching family prefix."""
    matches = [name for name in REFERENCE_MODULES if family.startswith(name)]
    layers, attn, mlp = REFERENCE_MODULES[max(matches, key=len)] if matches else LLAMA_MODULES
    return list(_path(ref, layers)), attn, mlp  # type: ignore[call-overload]


def branch_scale(ref: torch.nn.Module, family: str) -> float:
    """Our ``attn_out`` / ``mlp_out`` ÷ the output of ``transformers``' branch module."""
    matches = [name for name in BRANCH_SCALES if family.startswith(name)]
    if not matches:
        return 1.0
    return float(getattr(ref.config, BRANCH_SCALES[max(matches, key=len)]))


def submodule(layer: torch.nn.Module, dotted: str) -> torch.nn.Module:
    module = _path(layer, dotted)
    assert isinstance(module, torch.nn.Module)
    return module


def load_reference(folder: Path, dtype: torch.dtype = torch.float32) -> tf.PreTrainedModel:
    """The same checkpoint through ``transformers`` (eager attention): the oracle."""
    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager"
    )
    return model.eval()
