"""The embedded default: runs on a laptop CPU in minutes, downloads nothing.

1. A sentencepiece tokenizer (4096 tokens) is trained on the shipped corpus, the Python
   standard library's own source files (`lctx_jax.data.STDLIB`: long, real documents, the
   same on every machine), and cached.
2. stage "pretrain": a small LLaMA (4 layers, hidden 256, 4 query / 2 key-value heads of 64)
   trained from scratch at a 256-token context. Half of every batch's rows (8 of 16) are
   synthetic retrieval documents in the corpus's style (`lctx_jax.retrieval`: one or two
   constants set somewhere in lines of a real source file, asked for at the end), so that the
   model learns to retrieve inside its window: passkey retrieval at 1× is what the extension
   must keep at 8×.
3. stage "extend": YaRN with s = 8 (a 2048-token window) and a short fine-tune on 1024-token
   rows (half the window, as YaRN trains s = 32 on 64K for 128K), a quarter of them retrieval
   documents (up to 4 needles each). It ends with a table of held-out perplexity at 256,
   1024 and 2048 tokens for the base model, the base with YaRN and no fine-tune, and the
   fine-tuned model (runs/demo/summary/extend.json).

    python train.py --config configs/demo.py
    python train.py --config configs/demo.py --config.extend_rope_type=linear   # PI instead
    python train.py --config configs/demo.py --config.pretrain_steps=50 --config.run_dir=/tmp/d
"""

import ml_collections

from lctx_jax.train_config import default_config, stage

CONTEXT = 256  # the pre-training context L
FACTOR = 8  # the extension factor s: a window of 2048 tokens
TUNE_LENGTH = 1024  # the extension fine-tune's rows
# Retrieval rows (`lctx_jax.retrieval`): half of pre-training's rows (8 of 16), a quarter of the
# fine-tune's (1 of 4); their answers and restated values weigh 20 in the loss.
PRETRAIN_RETRIEVAL = {"share": 0.5, "max_needles": 2, "answer_weight": 20.0}
EXTEND_RETRIEVAL = {"share": 0.25, "max_needles": 4, "answer_weight": 20.0}
EXTEND_LR = 1e-4  # a twentieth of pre-training's peak, half its final learning rate


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.run_dir = "runs/demo"
    c.tokenizer = "~/.cache/lctx_jax/stdlib-3.11.7-4096.model"
    c.tokenizer_vocab_size = 4096
    c.model = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=704,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    c.optimizer.weight_decay = 0.1
    c.optimizer.min_lr_ratio = 0.1
    c.pretrain_steps = 500
    c.extend_steps = 40
    c.extend_rope_type = "yarn"
    c.stages = [
        stage("pretrain", seq_len=CONTEXT, batch_size=16, steps=c.get_ref("pretrain_steps"),
              lr=2e-3, warmup_steps=c.get_ref("pretrain_steps") // 10, schedule="cosine",
              retrieval=PRETRAIN_RETRIEVAL),
        extend_stage(c, ml_collections.ConfigDict(dict(
            rope_type=c.get_ref("extend_rope_type"), factor=float(FACTOR),
            original_max_position_embeddings=CONTEXT))),
    ]
    c.checkpoint_every = 50
    c.log_every = 10
    c.eval_batches = 8
    return c


def extend_stage(c: ml_collections.ConfigDict, rope_scaling, **fields
                 ) -> ml_collections.ConfigDict:
    """The extension fine-tune: 4 rows of 1024 tokens a step, one of them a retrieval document,
    the text rows from documents of at least 512 tokens; AdamW from fresh moments, so the
    learning rate warms up over a fifth of the steps to EXTEND_LR (a twentieth of
    pre-training's peak) and decays by cosine. `fields` override stage fields (LongLoRA's
    attention, lr)."""
    settings = dict(seq_len=TUNE_LENGTH, batch_size=4, steps=c.get_ref("extend_steps"),
                    lr=EXTEND_LR, warmup_steps=c.get_ref("extend_steps") // 5,
                    schedule="cosine", min_doc_tokens=TUNE_LENGTH // 2,
                    rope_scaling=rope_scaling, retrieval=EXTEND_RETRIEVAL)
    return stage("extend", **{**settings, **fields})
