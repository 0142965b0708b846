"""Context-extension methods by name, as the rope_scaling dict each puts on a checkpoint.

    scaling("yarn", factor=8.0, original=4096)
    -> {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}

Names: none (the checkpoint's own RoPE), pi (linear, Chen et al. 2023), ntk (static NTK-aware
base), dynamic (dynamic NTK), yarn (Peng et al. 2023), llama3 (Llama 3.1's, Meta's low/high
frequency factors 1 and 4). LongRoPE has no closed form: its factors come from the search
(`lctx_jax.longrope_search`), as a dict or JSON file.
"""

from __future__ import annotations

from typing import Any

METHODS = ("none", "pi", "ntk", "dynamic", "yarn", "llama3")


def scaling(method: str, factor: float, original: int) -> dict[str, Any] | None:
    """The rope_scaling dict of `method` extending a window of `original` tokens `factor`×
    (every method's dict names `original`: the model's max_position_embeddings becomes
    original·factor, dynamic NTK's stays `original`; see `lctx_jax.RopeConfig.from_hf`)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; use one of {METHODS} (LongRoPE: pass "
                         "the searched rope_scaling dict or JSON file instead)")
    if method == "none":
        return None
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1 (it is the extension ratio)")
    rope_type = {"pi": "linear"}.get(method, method)
    out: dict[str, Any] = {"rope_type": rope_type, "factor": float(factor),
                           "original_max_position_embeddings": int(original)}
    if method == "llama3":
        out.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return out
