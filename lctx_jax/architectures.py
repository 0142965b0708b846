"""The config.json architectures of the published checkpoints that configs/ recipes start from,
so that `train.py --compile_only` can size a recipe before anything is downloaded.

The fields are those of each model's config.json on the Hugging Face hub (architecture only:
sizes, heads, vocabulary, RoPE base, norm epsilon, sliding window, special token ids).
"""

from __future__ import annotations

import pathlib
from typing import Any

PUBLISHED: dict[str, dict[str, Any]] = {
    "Llama-2-7b-hf": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float16"},
    "Meta-Llama-3-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16"},
}


def published(checkpoint_dir: str) -> dict[str, Any] | None:
    """The shipped config.json dict of the checkpoint directory `checkpoint_dir` names (by its
    last path component, case-insensitively, e.g. "/ckpt/Llama-2-7b-hf"), or None."""
    name = pathlib.PurePath(str(checkpoint_dir).rstrip("/")).name.lower()
    for known, config in PUBLISHED.items():
        if known.lower() == name:
            return dict(config)
    return None
