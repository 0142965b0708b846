"""Correctness on the accelerator at hand, before its benchmarks: every attention impl that runs
on this backend against attend(impl="xla") on the same device, values and gradients.

Impls: "flash" (the fused-RoPE Pallas kernel, default driver), "splash" (TPU), "cudnn" (GPU).
Cases: B=2, T=512 (and T=1000, which no block divides), Hq=8, Hkv=2, D=64 and 128, causal,
packed documents (segment ids, positions restarting per document), yarn RoPE; f32 (tolerance
2e-3, every dot at "highest" precision so the reference is not a bf16 pass of the matrix
unit) and bf16 (5e-2 of the largest magnitude; cudnn: bf16 only). Prints one line per case, then "device check: N passed, M failed" and
exits 1 if any failed. On CPU the kernels would run interpreted: use tests/ there instead.

Run:  python benchmarks/device_check.py
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lctx_jax as lx

IMPLS = {"gpu": ("flash", "cudnn"), "tpu": ("flash", "splash")}
DTYPES = {"cudnn": (jnp.bfloat16,)}  # cuDNN's fused attention takes no f32; others: both
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 5e-2}


def case(impl: str, length: int, head_dim: int, dtype: Any, packed: bool) -> float:
    """max |impl − xla| / max |xla| over out, dq, dk, dv."""
    rope = lx.RopeConfig.from_hf({
        "head_dim": head_dim, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 256}})
    keys = jax.random.split(jax.random.key(length + head_dim), 4)
    q = jax.random.normal(keys[0], (2, length, 8, head_dim), dtype)
    k, v = (jax.random.normal(key, (2, length, 2, head_dim), dtype) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, dtype)
    index = jnp.arange(length)
    segments = (index >= length // 3).astype(jnp.int32) + (index >= 2 * length // 3)
    starts = jnp.array([0, length // 3, 2 * length // 3])[segments]
    positions = jnp.broadcast_to(index - starts if packed else index, (2, length))
    segment_ids = jnp.broadcast_to(segments, (2, length)) if packed else None

    @jax.jit
    def run(q, k, v, cotangent):
        results = []
        for name in (impl, "xla"):
            out, vjp = jax.vjp(lambda q, k, v, name=name: lx.attention.attend(
                q, k, v, impl=name, rope=rope, positions=positions, segment_ids=segment_ids),
                q, k, v)
            results.append((out, *vjp(cotangent)))
        return results

    with jax.default_matmul_precision("highest"):
        ours, reference = run(q, k, v, cotangent)
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                     / jnp.max(jnp.abs(b.astype(jnp.float32))))
               for a, b in zip(ours, reference))


def main() -> int:
    backend = jax.default_backend()
    if backend not in IMPLS:
        print(f"device check: backend {backend!r} has no accelerator kernels; run pytest")
        return 1
    passed = failed = 0
    for impl in IMPLS[backend]:
        for length in (512, 1000):
            for head_dim in (64, 128):
                for dtype in DTYPES.get(impl, (jnp.float32, jnp.bfloat16)):
                    for packed in (False, True):
                        label = (f"{impl:6s} T={length:4d} D={head_dim:3d} "
                                 f"{np.dtype(dtype).name:8s} {'packed' if packed else 'plain '}")
                        try:
                            error = case(impl, length, head_dim, dtype, packed)
                            ok = error <= TOLERANCE[dtype]
                            detail = f"relative error {error:.2e}"
                        except Exception as err:  # an unsupported shape is a failure too
                            ok, detail = False, f"{type(err).__name__}: {str(err)[:120]}"
                        passed, failed = passed + ok, failed + (not ok)
                        print(f"{'PASS' if ok else 'FAIL'} {label} {detail}", flush=True)
    print(f"device check: {passed} passed, {failed} failed on {jax.devices()[0].device_kind}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
