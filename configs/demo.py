"""The embedded default: runs on a laptop CPU in minutes, downloads nothing.

1. A sentencepiece tokenizer (4096 tokens) is trained on the Python standard library's own
   source files (present wherever Python is; long, real documents) and cached.
2. stage "pretrain": a small LLaMA (4 layers, hidden 256, 4 query / 2 key-value heads of 64)
   trained from scratch at a 256-token context.
3. stage "extend": the context is extended 4x to 1024 tokens with YaRN (s=4) and a short
   fine-tune on documents of at least 1024 tokens.

    python train.py --config configs/demo.py
    python train.py --config configs/demo.py --config.extend_rope_type=linear   # PI instead
    python train.py --config configs/demo.py --config.pretrain_steps=50 --config.run_dir=/tmp/d
"""

import ml_collections

from lctx_jax.train_config import default_config, stage

CONTEXT = 256  # the pre-training context L
FACTOR = 4  # the extension factor s


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.run_dir = "runs/demo"
    c.tokenizer = "~/.cache/lctx_jax/stdlib-4096.model"
    c.tokenizer_vocab_size = 4096
    c.model = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=704,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    c.optimizer.weight_decay = 0.1
    c.optimizer.min_lr_ratio = 0.1
    c.pretrain_steps = 400
    c.extend_steps = 60
    c.extend_rope_type = "yarn"
    c.stages = [
        stage("pretrain", seq_len=CONTEXT, batch_size=16, steps=c.get_ref("pretrain_steps"),
              lr=2e-3, warmup_steps=c.get_ref("pretrain_steps") // 10, schedule="cosine"),
        extend_stage(c, ml_collections.ConfigDict(dict(
            rope_type=c.get_ref("extend_rope_type"), factor=float(FACTOR),
            original_max_position_embeddings=CONTEXT))),
    ]
    c.checkpoint_every = 50
    c.log_every = 10
    c.eval_batches = 8
    return c


def extend_stage(c: ml_collections.ConfigDict, rope_scaling) -> ml_collections.ConfigDict:
    """The extension fine-tune: 4 × 1024-token rows of documents at least 1024 tokens long."""
    return stage("extend", seq_len=CONTEXT * FACTOR, batch_size=4,
                 steps=c.get_ref("extend_steps"), lr=2e-4,
                 warmup_steps=c.get_ref("extend_steps") // 12,
                 min_doc_tokens=CONTEXT * FACTOR, rope_scaling=rope_scaling)
