"""An independent plain-PyTorch (CPU, float64) forward of the released MEGALODON model
(XuezheMax/megalodon: megalodon/model/mega.py, megalodon/modules/*), used by
tests/test_megalodon_model.py as the reference for lctx_jax's implementation.

It reads a checkpoint directory as `lctx_jax.to_hf` writes it -- model.safetensors holding the
released state dict's tensor names (embed.weight, layers.N.mega.*, layers.N.nffn.*,
output.final_norm.*, output.output.weight) and config.json -- and never imports lctx_jax.

What it follows, step by step (the released Python modules; the CUDA kernels those call are
replaced by the recurrences they compute, evaluated one time step at a time):

  Mega.forward            emb = embed[tokens] (· √model_dim if scale_emb); every layer; output
  MegaBlock.forward       y = mega(x); out = nffn(y, residual=x)
  MovingAverageGatedAttention.forward
      u   = TimestepNorm(x)                       (timenorm, the prior buffers as its start)
      c   = CEMA(u)                               (cema, from a zero state)
      mx  = RMSNorm(c)·(w+1)                      (rmsnorm)
      z   = RMSNorm_per_head(mx Wz + bz)          (znorm, no affine)
      q,k = z·(gamma+1)/√d_head + beta            (gamma[0], beta[0] -> q; [1] -> k)
      v   = silu(u Wv + bv);  r = silu(mx Wr + br)
      a   = chunked causal softmax(q kᵀ) v       (no 1/√d; RoPE per chunk, positions from 0)
      out = mx Wh1 + bh1 + (a·r) Wh2 + x
  NormalizedFeedForwardNetwork.forward
      n = LayerNorm(y)·(w+1) + b;  h = silu(n W1ᵀ) (· n W3ᵀ with swiglu);  out = h W2ᵀ + x
  MegaOutputLayer.forward   logits = TimestepNorm(x) · output.weight ᵀ (the embedding if
                            share_emb: the released module reuses that Parameter)

TimestepNorm (timestep_norm_kernel.cu, group version): for each batch row and group, a running
(count, mean, var) starts at (prior_count, prior_mean, exp(prior_logv)); at every time step the
step's group mean and population variance over the group's D/G features are merged into it as
one Welford item of count 1 (WelfordData::operator+= with {1, mean, var}); y = (x − mean) ·
rsqrt(var + eps) · (weight + 1) + bias. A padded step (mask) is skipped and gives 0.

CEMA (ema_parameters / fftconv / ema_hidden): p = σ(alpha), q = polar(1 − σ(alpha)σ(delta),
n·σ(theta)·2π/N) for n = 1..N, η = view_as_complex(gamma)/√N; h_t = p·x_t + q·h_{t−1}
from h_{−1} = 0, y_t = Re Σ_n η_n h_{t,n} + omega·x_t.

Documents (not in the released code, which trains on one stream): with `segment_ids` [B, T],
attention keeps to keys of the same non-zero segment id, a query that sees no key gets 0, and
segment id 0 marks padding that TimestepNorm skips; CEMA and the norm statistics run across
document boundaries. That is lctx_jax's documented extension; without segment_ids the forward
is exactly the released one.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

DTYPE = torch.float64


@dataclass(frozen=True)
class ReleasedConf:
    """The fields of the released ModelConf this forward needs, with ModelConf's defaults."""

    num_layers: int = 8
    model_dim: int = 1024
    z_dim: int = 256
    value_dim: int = 2048
    num_heads: int = 1
    ffn_hidden_dim: int = 2048
    cema_ndim: int = 16
    chunk_size: int = 2048
    vocab_size: int = -1
    output_size: int = -1
    norm_num_groups: int = 32
    norm_affine: bool = True
    norm_eps: float = 1e-5
    rope_base: float | None = None
    dropout: float = 0.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    swiglu: bool = False
    rescale_nffn: bool = False
    scale_emb: bool = False
    share_emb: bool = False

    @classmethod
    def from_json(cls, hf: dict, **overrides) -> ReleasedConf:
        """Only the keys ModelConf knows are read (others, e.g. model_type, are ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in hf.items() if k in known}
        fields.update(overrides)
        conf = cls(**fields)
        if conf.rescale_nffn or not conf.norm_affine or conf.dropout or conf.hidden_dropout \
                or conf.attention_dropout:
            raise NotImplementedError("the reference implements the inference forward with "
                                      "norm_affine, no rescale_nffn, no dropout")
        return conf

    @property
    def z_head_dim(self) -> int:
        return self.z_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def base(self) -> float:
        return 10000.0 if self.rope_base is None else float(self.rope_base)


# ----------------------------------------------------------------------------- the pieces


def timestep_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                  eps: float, prior_count: torch.Tensor, prior_mean: torch.Tensor,
                  prior_logv: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, D] -> y [B, T, D], one time step after another. padding [B, T] bool (True: a
    padded step, skipped)."""
    b, t, d = x.shape
    per_group = x.reshape(b, t, groups, d // groups)
    step_mean = per_group.mean(-1)                                        # [B, T, G]
    step_var = (per_group - step_mean[..., None]).pow(2).mean(-1)         # population
    count = torch.full((b, 1), int(prior_count), dtype=DTYPE)
    mean = prior_mean.to(DTYPE).expand(b, groups).clone()
    var = prior_logv.to(DTYPE).exp().expand(b, groups).clone()
    scale = weight.to(DTYPE) + 1.0
    out = torch.empty_like(x)
    for i in range(t):
        new_count = count + 1
        c2 = 1.0 / new_count                       # the new item's share
        c1 = 1.0 - c2
        delta = step_mean[:, i] - mean
        new_mean = c1 * mean + c2 * step_mean[:, i]
        new_var = c1 * var + c2 * step_var[:, i] + (c1 * delta) * (c2 * delta)
        if padding is None:
            count, mean, var = new_count, new_mean, new_var
        else:
            skip = padding[:, i, None]
            count = torch.where(skip, count, new_count)
            mean = torch.where(skip, mean, new_mean)
            var = torch.where(skip, var, new_var)
        rstd = torch.rsqrt(var + eps)                                     # [B, G]
        y = (per_group[:, i] - mean[..., None]) * rstd[..., None]
        y = y.reshape(b, d) * scale + bias.to(DTYPE)
        if padding is not None:
            y = torch.where(padding[:, i, None], torch.zeros_like(y), y)
        out[:, i] = y
    return out


def cema(x: torch.Tensor, alpha: torch.Tensor, delta: torch.Tensor, theta: torch.Tensor,
         gamma: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] -> y [B, T, D] by the recurrence h_t = p x_t + q h_{t-1} (complex128)."""
    b, t, d = x.shape
    ndim = alpha.shape[1]
    a = torch.sigmoid(alpha.to(DTYPE))[..., 0]                            # [D, N]
    dl = torch.sigmoid(delta.to(DTYPE))[..., 0]
    angle = (torch.arange(1, ndim + 1, dtype=DTYPE)[None, :]
             * (torch.sigmoid(theta.to(DTYPE))[:, 0, 0] * (2 * math.pi / ndim))[:, None])
    p = a.to(torch.complex128)
    q = torch.polar(1.0 - a * dl, angle)                                  # [D, N] complex
    eta = torch.view_as_complex(gamma.to(DTYPE).contiguous()) * math.sqrt(1.0 / ndim)
    w = omega.to(DTYPE)[:, 0]
    h = torch.zeros(b, d, ndim, dtype=torch.complex128)
    out = torch.empty_like(x)
    for i in range(t):
        h = p * x[:, i, :, None].to(torch.complex128) + q * h
        out[:, i] = (eta * h).sum(-1).real + w * x[:, i]
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """apex's manual_rms_norm, with FusedRMSNorm's weight + 1."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (weight.to(DTYPE) + 1.0)


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """apply_rotary_emb on x [N, C, H, d] with positions 0..C-1 (a chunk): pairs (2i, 2i+1)
    are complex numbers rotated by position · base^(-2i/d)."""
    c, d = x.shape[1], x.shape[-1]
    inv = 1.0 / torch.tensor([base ** (j / d) for j in range(0, d, 2)], dtype=DTYPE)
    angles = torch.outer(torch.arange(c, dtype=DTYPE), inv)               # [C, d/2]
    freqs = torch.polar(torch.ones_like(angles), angles)[:, None]         # [C, 1, d/2]
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * freqs).flatten(-2)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int,
                    base: float, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """q, k [B, T, H, dz], v [B, T, H, dv] -> [B, T, H·dv]: T ≤ chunk is one chunk, else T is
    cut into T/chunk chunks; inside each, RoPE from position 0, causal softmax(q kᵀ) v."""
    b, t, heads, _ = q.shape
    size = min(t, chunk)
    assert t % size == 0, (t, chunk)
    n = t // size

    def split(x):  # [B, T, H, e] -> [B·n, size, H, e]
        return x.reshape(b * n, size, heads, x.shape[-1])

    qc, kc, vc = rotary(split(q), base), rotary(split(k), base), split(v)
    scores = torch.einsum("nqhd,nkhd->nhqk", qc, kc)
    visible = torch.ones(size, size, dtype=torch.bool).tril()[None, None]
    if segment_ids is not None:
        seg = segment_ids.reshape(b * n, size)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
        visible = visible & same[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)   # a query that sees no key: zeros
    out = torch.einsum("nhqk,nkhd->nqhd", weights, vc)
    return out.reshape(b, t, heads * v.shape[-1])


# ----------------------------------------------------------------------------- the model


class MegalodonReference:
    """The released model's forward on the tensors of a checkpoint directory."""

    def __init__(self, directory: str | pathlib.Path, **config_overrides) -> None:
        directory = pathlib.Path(directory)
        self.raw_config = json.loads((directory / "config.json").read_text())
        self.conf = ReleasedConf.from_json(self.raw_config, **config_overrides)
        self.state = {name: value.to(DTYPE) if value.is_floating_point() else value
                      for name, value in load_file(str(directory / "model.safetensors")).items()}

    def w(self, name: str) -> torch.Tensor:
        return self.state[name]

    def linear(self, x: torch.Tensor, name: str, bias: bool) -> torch.Tensor:
        return F.linear(x, self.w(name + ".weight"), self.w(name + ".bias") if bias else None)

    def timenorm(self, x: torch.Tensor, prefix: str, padding: torch.Tensor | None
                 ) -> torch.Tensor:
        c = self.conf
        return timestep_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"),
                             c.norm_num_groups, c.norm_eps, self.w(prefix + ".prior_count"),
                             self.w(prefix + ".prior_mean"), self.w(prefix + ".prior_logv"),
                             padding)

    def mega(self, x: torch.Tensor, i: int, segment_ids: torch.Tensor | None,
             padding: torch.Tensor | None) -> torch.Tensor:
        c = self.conf
        pre = f"layers.{i}.mega."
        b, t, _ = x.shape
        residual = x
        out_tsn = self.timenorm(x, pre + "timenorm", padding)
        out_cema = cema(out_tsn, *(self.w(pre + "cema." + n)
                                   for n in ("alpha", "delta", "theta", "gamma", "omega")))
        mx = rms_norm(out_cema, self.w(pre + "rmsnorm.weight"), c.norm_eps)
        z = self.linear(mx, pre + "wz", True).reshape(b, t, c.num_heads, c.z_head_dim)
        z = rms_norm(z, None, c.norm_eps).reshape(b, t, c.z_dim)
        gamma = (self.w(pre + "gamma") + 1.0) / math.sqrt(c.z_head_dim)   # [2, z_dim]
        qk = z[:, :, None] * gamma + self.w(pre + "beta")
        q, k = qk.unbind(2)
        v = F.silu(self.linear(out_tsn, pre + "wv", True))
        r = F.silu(self.linear(mx, pre + "wr", True))
        attn = chunk_attention(q.reshape(b, t, c.num_heads, c.z_head_dim),
                               k.reshape(b, t, c.num_heads, c.z_head_dim),
                               v.reshape(b, t, c.num_heads, c.v_head_dim),
                               c.chunk_size, c.base, segment_ids)
        h = self.linear(mx, pre + "wh1", True) + self.linear(attn * r, pre + "wh2", False)
        return h + residual

    def nffn(self, y: torch.Tensor, residual: torch.Tensor, i: int) -> torch.Tensor:
        c = self.conf
        pre = f"layers.{i}.nffn."
        n = F.layer_norm(y, (c.model_dim,), self.w(pre + "norm.weight") + 1.0,
                         self.w(pre + "norm.bias"), c.norm_eps)
        hidden = F.silu(self.linear(n, pre + "fc1", False))
        if c.swiglu:
            hidden = hidden * self.linear(n, pre + "fc3", False)
        return self.linear(hidden, pre + "fc2", False) + residual

    def hidden(self, tokens, segment_ids=None) -> torch.Tensor:
        """The final-normed hidden states [B, T, D] (float64)."""
        c = self.conf
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        t = tokens.shape[1]
        assert t < c.chunk_size or t % c.chunk_size == 0, (t, c.chunk_size)
        if segment_ids is not None:
            segment_ids = torch.as_tensor(segment_ids, dtype=torch.long)
        padding = None if segment_ids is None else segment_ids == 0
        x = F.embedding(tokens, self.w("embed.weight"))
        if c.scale_emb:
            x = x * math.sqrt(c.model_dim)
        for i in range(c.num_layers):
            y = self.mega(x, i, segment_ids, padding)
            x = self.nffn(y, x, i)
        return self.timenorm(x, "output.final_norm", padding)

    def head_weight(self) -> torch.Tensor:
        return self.w("embed.weight") if self.conf.share_emb else self.w("output.output.weight")

    def logits(self, tokens, segment_ids=None) -> torch.Tensor:
        """[B, T, vocab] float64."""
        with torch.no_grad():
            return F.linear(self.hidden(tokens, segment_ids), self.head_weight())
