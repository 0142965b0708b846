"""Infini-attention (Munkhdalai, Faruqui, Gopal 2024, "Leave No Context Behind", arXiv
2404.07143): softmax attention inside segments of N tokens plus a compressive memory that
carries everything before the segment.

Per segment s and query head h (key/value head g = h // (Hq/Hkv)), with σ(x) = ELU(x) + 1
(Katharopoulos et al. 2020) on the *un-rotated* q and k:

    A_dot = causal softmax(q_rot k_rotᵀ / √D) v         within the segment (RoPE here only)
    A_mem = σ(q) M_{s−1} / (σ(q) z_{s−1})                0 while z = 0 (the first segment)
    out   = sigmoid(β_h) · A_mem + (1 − sigmoid(β_h)) · A_dot
    linear  M_s = M_{s−1} + σ(k)ᵀ v
    delta   M_s = M_{s−1} + σ(k)ᵀ (v − σ(k) M_{s−1} / (σ(k) z_{s−1}))   (0 term while z = 0)
            z_s = z_{s−1} + Σ_t σ(k_t)

M [Hkv, D, D] and z [Hkv, D] are f32 whatever the compute dtype (z grows with every token; fp16
overflows) and the memory einsums run at full f32 precision. The memory is read before it is
written, so no token sees a later one.

Packed documents (`segment_ids`): segments are cut by token index, and the memory belongs to one
document, the one of the last token written (`doc`). A token reads the memory only if it is of
that document; a segment writes only its last token's document's tokens, and first clears the
memory when that document is not the memory's. So no document ever reads another's tokens:
the local path is masked by segment ids as everywhere in `lctx_jax.attention`.

Training runs the segments as one `lax.scan` whose body is rematerialised (`jax.checkpoint`):
the backward pass stores (M, z) per segment and recomputes the segment's attention, so memory
grows with T only through the [B, T, ...] inputs and outputs and the S = T/N carries. A
trailing partial segment is padded (the padding is never read or written) and cut off.

`stream` runs a model layer's decode state: (M, z, doc) plus one segment of local KV cache, so
generation holds O(N) keys whatever the prompt length (`lctx_jax.layers.self_attention`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lctx_jax import rope as rope_lib
from lctx_jax.attention import masks, xla

UPDATES = ("linear", "delta")
GATE = "infini_gate"  # the parameter name of a layer's gate logits [Hq] in every model
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class InfiniConfig:
    """A model's Infini-attention settings (config.json's "infini_attention").

    segment_len: N, tokens per segment (the paper: 2048). update: "linear" or "delta".
    gate_init: the initial gate logit β of every head of every layer; sigmoid(0) = 0.5 weighs
    both paths equally, where the gate's gradient sigmoid'(β) is largest (at −100 the memory
    path is frozen out, a pitfall reimplementations met).
    """

    segment_len: int
    update: str = "linear"
    gate_init: float = 0.0

    FIELDS = ("segment_len", "update", "gate_init")

    def __post_init__(self) -> None:
        n = self.segment_len
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"infini.segment_len={n!r} must be an int >= 1 (tokens per "
                             "segment, e.g. 2048)")
        if self.update not in UPDATES:
            raise ValueError(f"infini.update={self.update!r}; use one of {UPDATES}")
        if not isinstance(self.gate_init, (int, float)) or not math.isfinite(self.gate_init):
            raise ValueError(f"infini.gate_init={self.gate_init!r} must be a finite number (the "
                             "initial gate logit; 0 weighs memory and local attention equally)")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> "InfiniConfig":
        """From {"segment_len": N, "update": ..., "gate_init": ...}; unknown keys are refused."""
        if not isinstance(settings, Mapping):
            raise ValueError(f"infini settings must be a dict like {{'segment_len': 2048}}, got "
                             f"{settings!r}")
        unknown = set(settings) - set(cls.FIELDS)
        if unknown:
            raise ValueError(f"infini has unknown fields {sorted(unknown)}; known: {cls.FIELDS}")
        if "segment_len" not in settings:
            raise ValueError("infini.segment_len is missing: give the tokens per segment, e.g. "
                             "infini={'segment_len': 2048}")
        n = settings["segment_len"]
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        return cls(n, settings.get("update", "linear"), float(settings.get("gate_init", 0.0)))

    @classmethod
    def over(cls, stored: "InfiniConfig | None", settings: Mapping[str, Any] | None
             ) -> "InfiniConfig":
        """`settings` (None: none) put over the `stored` settings of a model (None: none)."""
        return cls.from_dict({**(stored.to_dict() if stored is not None else {}),
                              **(settings or {})})

    def to_dict(self) -> dict[str, Any]:
        return {"segment_len": self.segment_len, "update": self.update,
                "gate_init": self.gate_init}


class State(NamedTuple):
    """The compressive memory of one layer: m [B, Hkv, D, D], z [B, Hkv, D] (f32), and doc [B]
    int32, the segment id of the document the memory holds."""

    m: jax.Array
    z: jax.Array
    doc: jax.Array


def initial_state(batch: int, num_kv_heads: int, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """The empty memory (M, z): zeros [B, Hkv, D, D] and [B, Hkv, D], f32."""
    return (jnp.zeros((batch, num_kv_heads, head_dim, head_dim), jnp.float32),
            jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32))


def sigma(x: jax.Array) -> jax.Array:
    """ELU(x) + 1 in f32: positive, so σ(q)·z > 0 exactly when z holds a written key."""
    x = x.astype(jnp.float32)
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, segment_len: int,
           update: str = "linear", rope: rope_lib.RopeConfig | None = None,
           positions: jax.Array | None = None, state: tuple | None = None, *,
           segment_ids: jax.Array | None = None, scale: float | None = None,
           window: int | None = None) -> Any:
    """Infini-attention over q [B, T, Hq, D], k, v [B, T, Hkv, D] (un-rotated) -> out
    [B, T, Hq, D] in q's dtype, or (out, state) when `state` is given.

    gate [Hq]: the gate logits β. segment_len N: T need not be a multiple (the last segment is
    shorter). rope: rotates q and k of the local path at `positions` [B, T] (default t mod N,
    the index inside the segment), with one seq_len N for every segment. state: the memory
    carried in, (M, z) or (M, z, doc) (`initial_state`; doc [B], the segment id the memory
    belongs to, needed with segment_ids); returned in the same form after the last segment.
    segment_ids [B, T]: packed documents (see the module docstring); without them every token
    is of the state's document (doc). scale: default 1/√D. window: a sliding window on the
    local path too (Mistral's, for segments longer than it).
    """
    batch, length, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    _check(q, k, v, gate, segment_len, update, state, segment_ids)
    n = segment_len
    count = -(-length // n)
    padded = count * n
    index = jnp.arange(padded, dtype=jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(index % n, (batch, padded))
    else:
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, length))
        # padding after every real position: no real query sees it (causal by position)
        positions = jnp.pad(positions, ((0, 0), (0, padded - length)),
                            constant_values=jnp.iinfo(jnp.int32).max)
    written = jnp.broadcast_to(index < length, (batch, padded))

    def per_segment(x: jax.Array) -> jax.Array:  # [B, S·N, ...] -> [S, B, N, ...]
        x = jnp.pad(x, ((0, 0), (0, padded - length)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, count, n, *x.shape[2:]), 1, 0)

    if state is None:
        carry = State(*initial_state(batch, kv_heads, head_dim),
                      jnp.zeros((batch,), jnp.int32))
    else:
        doc = state[2] if len(state) == 3 else jnp.zeros((batch,), jnp.int32)
        carry = State(state[0].astype(jnp.float32), state[1].astype(jnp.float32),
                      jnp.asarray(doc, jnp.int32))
    if segment_ids is None:  # one document: the memory's own (0 from an empty state)
        documents = jnp.broadcast_to(carry.doc[:, None], (batch, length))
    else:
        documents = jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), (batch, length))
    documents = jnp.pad(documents, ((0, 0), (0, padded - length)), mode="edge")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    @jax.checkpoint
    def body(memory: State, xs: tuple) -> tuple[State, jax.Array]:
        q_s, k_s, v_s, pos_s, doc_s, written_s = xs
        local = local_attention(q_s, k_s, v_s, pos_s, doc_s, rope, n, scale, window=window)
        out = mix(gate, read(sigma(q_s), memory, doc_s), local).astype(q.dtype)
        return write(memory, sigma(k_s), v_s, doc_s, written_s, update), out

    xs = tuple(per_segment(x) for x in (q, k, v)) + tuple(
        jnp.moveaxis(x.reshape(batch, count, n), 1, 0) for x in (positions, documents, written))
    carry, out = lax.scan(body, carry, xs)
    out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, q_heads, head_dim)[:, :length]
    if state is None:
        return out
    return out, (tuple(carry) if len(state) == 3 else (carry.m, carry.z))


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                    documents: jax.Array, rope: rope_lib.RopeConfig | None, segment_len: int,
                    scale: float, kv_positions: jax.Array | None = None,
                    kv_documents: jax.Array | None = None, window: int | None = None
                    ) -> jax.Array:
    """Causal softmax attention of one segment's q [B, N_q, Hq, D] over its keys k, v
    [B, N_k, Hkv, D] (same document only, within `window` if given), RoPE at the local
    positions with seq_len N -> f32."""
    kv_positions = positions if kv_positions is None else kv_positions
    kv_documents = documents if kv_documents is None else kv_documents
    if rope is not None:
        q, k = rope_lib.rotate_qk(q, k, rope, positions, kv_positions, seq_len=segment_len)
    return xla.plain(q, k, v, mask=masks.Mask(True, window, None), positions=positions,
                     kv_positions=kv_positions, segment_ids=documents,
                     kv_segment_ids=kv_documents, scale=scale).astype(jnp.float32)


def read(sq: jax.Array, memory: State, documents: jax.Array) -> jax.Array:
    """A_mem = σ(q) M / (σ(q) z) for σ(q) [B, N, Hq, D] -> f32 [B, N, Hq, D]; 0 where z = 0 or
    the token's document is not the memory's."""
    b, t, q_heads, d = sq.shape
    kv_heads = memory.m.shape[1]
    grouped = sq.reshape(b, t, kv_heads, q_heads // kv_heads, d)
    num = jnp.einsum("btkgd,bkde->btkge", grouped, memory.m, precision=_HIGHEST)
    den = jnp.einsum("btkgd,bkd->btkg", grouped, memory.z, precision=_HIGHEST)[..., None]
    mine = (documents == memory.doc[:, None])[:, :, None, None, None]
    out = jnp.where((den > 0) & mine, num / jnp.where(den > 0, den, 1.0), 0.0)
    return out.reshape(b, t, q_heads, d)


def mix(gate: jax.Array, memory_out: jax.Array, local_out: jax.Array) -> jax.Array:
    """sigmoid(β_h) · A_mem + (1 − sigmoid(β_h)) · A_dot, per query head h, in f32."""
    g = jax.nn.sigmoid(gate.astype(jnp.float32))[:, None]
    return g * memory_out + (1.0 - g) * local_out


def write(memory: State, sk: jax.Array, v: jax.Array, documents: jax.Array, written: jax.Array,
          update: str) -> State:
    """The memory after one segment with σ(k) [B, N, Hkv, D], v [B, N, Hkv, D]: the tokens of
    the segment's last document that are `written` [B, N] enter it (linear or delta rule); the
    old memory is kept only if it holds that same document."""
    last = documents[:, -1]
    keep = (memory.doc == last).astype(jnp.float32)
    m, z = memory.m * keep[:, None, None, None], memory.z * keep[:, None, None]
    weight = (written & (documents == last[:, None])).astype(jnp.float32)[..., None, None]
    v = v.astype(jnp.float32)
    if update == "delta":
        num = jnp.einsum("btkd,bkde->btke", sk, m, precision=_HIGHEST)
        den = jnp.einsum("btkd,bkd->btk", sk, z, precision=_HIGHEST)[..., None]
        v = v - jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    sk = sk * weight
    m = m + jnp.einsum("btkd,btke->bkde", sk, v, precision=_HIGHEST)
    return State(m, z + jnp.sum(sk, axis=1), last)


def stream(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, config: InfiniConfig,
           rope: rope_lib.RopeConfig | None, state: dict, start: jax.Array,
           segment_ids: jax.Array | None, window: int | None = None
           ) -> tuple[jax.Array, dict]:
    """One model layer's Infini-attention with its decode state (`decode_state`): q [B, T, Hq,
    D], k, v [B, T, Hkv, D] -> (out [B, T, Hq, D], state), equal to `attend` over the whole
    stream so far. Segments are cut by the column index of the stream.

    T > 1 feeds a prefill chunk at column `start`, a multiple of N (0 starts a new stream: the
    memory is cleared; else the carried memory continues, `generate` prefills a long prompt
    segment by segment so): its complete segments go into the memory and the partial last one
    into the local cache. T == 1 appends the token at column `start`:
    attention over the cached part of its segment plus the memory; the token that completes
    a segment writes the segment into the memory (the cache's slots are then reused).
    """
    batch, length = q.shape[:2]
    n = config.segment_len
    scale = 1.0 / math.sqrt(q.shape[-1])
    docs = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None
            else jnp.asarray(segment_ids, jnp.int32))
    if length > 1:
        full = length // n * n
        fresh = jnp.asarray(start) == 0
        memory = State(*(jnp.where(fresh, jnp.zeros_like(x), x)
                         for x in (state["m"], state["z"], state["doc"])))
        outs = []
        if full:
            out, memory = attend(q[:, :full], k[:, :full], v[:, :full], gate, n, config.update,
                                 rope, state=tuple(memory), segment_ids=docs[:, :full],
                                 window=window)
            outs.append(out)
            memory = State(*memory)
        if full < length:
            outs.append(attend(q[:, full:], k[:, full:], v[:, full:], gate, n, config.update,
                               rope, state=tuple(memory), segment_ids=docs[:, full:],
                               window=window)[0])
        tail = ((0, 0), (0, n - (length - full)))
        cache = {"k": jnp.pad(k[:, full:], tail + ((0, 0), (0, 0))).astype(state["k"].dtype),
                 "v": jnp.pad(v[:, full:], tail + ((0, 0), (0, 0))).astype(state["v"].dtype),
                 "seg": jnp.pad(docs[:, full:], tail)}
        return jnp.concatenate(outs, axis=1), {**memory._asdict(), **cache}
    slot = jnp.asarray(start, jnp.int32) % n
    cache = {name: lax.dynamic_update_slice(state[name], new.astype(state[name].dtype),
                                            (0, slot) + (0,) * (new.ndim - 2))
             for name, new in (("k", k), ("v", v), ("seg", docs))}
    keys, values = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
    local = local_attention(q, keys, values, jnp.full((batch, 1), slot), docs, rope, n, scale,
                            kv_positions=jnp.broadcast_to(jnp.arange(n), (batch, n)),
                            kv_documents=cache["seg"], window=window)
    memory = State(state["m"], state["z"], state["doc"])
    out = mix(gate, read(sigma(q), memory, docs), local).astype(q.dtype)
    memory = lax.cond(slot == n - 1,
                      lambda m: write(m, sigma(keys), values, cache["seg"],
                                      jnp.ones((batch, n), bool), config.update),
                      lambda m: m, memory)
    return out, {**memory._asdict(), **cache}


def decode_state(num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 config: InfiniConfig, dtype: Any) -> dict:
    """The empty decode state of `stream` stacked over layers: m [L, B, Hkv, D, D], z
    [L, B, Hkv, D] (f32), doc [L, B], local cache k, v [L, B, N, Hkv, D] (`dtype`) and its
    segment ids seg [L, B, N]. Its size does not depend on the prompt."""
    n, lead = config.segment_len, (num_layers, batch)
    return {"m": jnp.zeros((*lead, num_kv_heads, head_dim, head_dim), jnp.float32),
            "z": jnp.zeros((*lead, num_kv_heads, head_dim), jnp.float32),
            "doc": jnp.zeros(lead, jnp.int32),
            "k": jnp.zeros((*lead, n, num_kv_heads, head_dim), dtype),
            "v": jnp.zeros((*lead, n, num_kv_heads, head_dim), dtype),
            "seg": jnp.zeros((*lead, n), jnp.int32)}


def _check(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, segment_len: int,
           update: str, state: tuple | None, segment_ids: jax.Array | None) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[:2] != k.shape[:2] or (
            q.shape[3] != k.shape[3]):
        raise ValueError(f"Infini-attention is self-attention: q [B, T, Hq, D] and k, v "
                         f"[B, T, Hkv, D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of key/value heads "
                         f"{k.shape[2]}")
    if gate.shape != (q.shape[2],):
        raise ValueError(f"gate must hold one logit per query head, shape ({q.shape[2]},); got "
                         f"{gate.shape}")
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"segment_len={segment_len!r} must be an int >= 1")
    if update not in UPDATES:
        raise ValueError(f"update={update!r}; use one of {UPDATES}")
    if segment_ids is not None and jnp.shape(segment_ids) not in (q.shape[:2], q.shape[1:2]):
        raise ValueError(f"segment_ids must be [B, T] = {q.shape[:2]}, got shape "
                         f"{jnp.shape(segment_ids)}")
    if state is not None:
        b, kv_heads, d = k.shape[0], k.shape[2], k.shape[3]
        if len(state) not in (2, 3) or state[0].shape != (b, kv_heads, d, d) or (
                state[1].shape != (b, kv_heads, d)):
            raise ValueError(f"state must be (M [B, Hkv, D, D], z [B, Hkv, D]) or (M, z, doc "
                             f"[B]) = ({(b, kv_heads, d, d)}, {(b, kv_heads, d)}); got shapes "
                             f"{[getattr(x, 'shape', None) for x in state]}")
        if segment_ids is not None and len(state) == 2:
            raise ValueError("with segment_ids, pass the state as (M, z, doc): doc [B] is the "
                             "segment id of the document the memory holds")
