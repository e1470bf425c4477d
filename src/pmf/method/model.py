"""pmfDiT: the pixel MeanFlow network (pMF paper section 6 and Table 8; official ``models/pmfDiT.py``).

A DiT variant with in-context conditioning. The network sees the noisy image z_t and the conditions
(h = t - r, omega, t_min, t_max, y) and outputs an *image* from each head; t itself is never embedded: it enters
only through the x -> u conversion ``u = (z - x) / max(t, 0.05)`` [pMF Eq. 11], done in one place,
:func:`velocity_from_output`.

Token sequence (official torch branch, `models/pmfDiT.py`), 20 prefix tokens then N patch tokens:

    [class(8) | omega(4) | t_min(2) | t_max(2) | time(4) | patches(N)]

(official defaults num_class_tokens=8, num_cfg_tokens=4, num_interval_tokens=2 *per endpoint*, num_time_tokens=4).

Shared trunk of ``depth - aux_head_depth`` blocks, then a u-head and (training only) a v-head of
``aux_head_depth`` blocks each, each with its own final layer. Parameter names follow the official PyTorch
checkpoint minus its ``_flax_linear`` / ``_flax_embedding`` wrappers, so :mod:`pmf.io.convert` is a short, explicit map.

Explicit tangents. Each module also has a ``jvp(x, dx, ...) -> (y, dy)``: its forward and the forward-mode tangent
dy = J(x) dx along dx, written as plain tensor ops (the closed form per layer: linear maps take the tangent through
the weight alone, RMSNorm d(x s) = dx s - x s^3 mean(x dx), silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))),
attention :func:`pmf.method.attention.attention_tangent`), so the same code runs eagerly and inside ``torch.compile`` as
one graph. :meth:`PMFDiT.u_and_tangent` is the lean objective's jvp of u along (dz, dt, dr) [MF Eq. 8]. Tangents
are built under ``no_grad``: the objective stops gradients through du/dt (pMF Eq. 12), so they need no history.
Blocks take the tangent through ``forward`` (``block(x, cos, sin, dx)``) so that FSDP2's per-block hooks run around
it.

PMFDiT is a ``huggingface_hub.PyTorchModelHubMixin`` and declares its own ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``: the one on-disk layout of a network, :mod:`pmf.method.pretrained` (config.json with the constructor
kwargs it records, model.safetensors, README.md).

This module needs only torch and huggingface_hub (and :mod:`pmf.method`, :mod:`pmf.util`), so it can be lifted out
alone.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.autograd.forward_ad as fwAD
import torch.utils.checkpoint
from huggingface_hub import PyTorchModelHubMixin

from pmf.method import pretrained
from pmf.method.attention import attention, attention_tangent

T_CLIP = 0.05  # x -> u divides by max(t, 0.05): JiT's clip of the noise-side time [J section 4.3]
PREDICTIONS = ("x", "u", "linear", "edm", "scm")


# ----------------------------------------------------------------------------------------------------------------
# The one place where the network's output becomes a velocity.


def bcast(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against ``like`` (cast to ``dtype`` when given)."""
    t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t if dtype is None else t.to(dtype)


def precondition(t: torch.Tensor, prediction: str, noise_scale: float = 1.0, sigma_data: float = 0.5):
    """Coefficients (c_in, c_skip, c_out) of x_theta = c_skip * z + c_out * net(c_in * z)  [pMF Table 3a].

    Path z_t = (1 - t) x + t * s * n with s = noise_scale, n ~ N(0, I), data std sigma_data (EDM's 0.5).
    - "x": the paper's plain x-prediction: c_skip = 0, c_out = 1, c_in = 1.
    - "linear": c_skip = 1 - t, c_out = t (pMF Table 3a's "linear" row), c_in = 1.
    - "edm": EDM's rule (Karras et al. 2022, Eq. 7 / Table 1) re-derived for this path: c_skip is the
      least-squares coefficient Cov(x, z) / Var(z) and c_out the std of the residual target, so the net's target has
      unit variance; c_in = 1 / std(z):
          var_z = (1 - t)^2 sigma_d^2 + (t s)^2
          c_skip = (1 - t) sigma_d^2 / var_z,  c_out = t s sigma_d / sqrt(var_z),  c_in = 1 / sqrt(var_z).
    - "scm": sCM's TrigFlow form (Lu & Song 2024, Eq. 6): z_t / alpha = cos(a) x + sin(a) sigma_d n with
      alpha = sqrt((1 - t)^2 + (t s / sigma_d)^2) and a = atan2(t s / sigma_d, 1 - t); x_theta =
      cos(a) (z / alpha) - sin(a) sigma_d F(z / (alpha sigma_d)). So c_skip = cos(a) / alpha, c_out = -sigma_d sin(a),
      c_in = 1 / (alpha sigma_d). On this path c_skip, |c_out| and c_in coincide with "edm" algebraically (checked
      in tests); only the sign of c_out differs, which a learned output layer absorbs. Both rows are kept so Table
      3a's ablation runs by name; the paper's gap between them (14.43 vs 13.81) must come from details it does not
      state (e.g. time conditioning), which we do not guess.
    Returns tensors of t's shape.
    """
    one = torch.ones_like(t)
    if prediction in ("x", "u"):  # "u": identity input scaling; c_skip / c_out unused (the output is u itself)
        return one, torch.zeros_like(t), one
    if prediction == "linear":
        return one, 1 - t, t
    sd, ts = sigma_data, t * noise_scale
    var_z = (1 - t) ** 2 * sd**2 + ts**2
    if prediction == "edm":
        return var_z.rsqrt(), (1 - t) * sd**2 / var_z, ts * sd * var_z.rsqrt()
    if prediction == "scm":
        alpha = var_z.sqrt() / sd
        angle = torch.atan2(ts / sd, 1 - t)
        return 1 / (alpha * sd), torch.cos(angle) / alpha, -sd * torch.sin(angle)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def velocity_from_output(z: torch.Tensor, t: torch.Tensor, out: torch.Tensor, c_skip, c_out, prediction: str):
    """Network output -> average velocity u (or v for the v-head)  [pMF Eq. 11].

    For every image-space prediction: x_theta = c_skip z + c_out out, then u = (z - x_theta) / max(t, 0.05).
    The clamp has zero derivative for t < 0.05, which the JVP inherits (official behaviour).
    For "u" (direct u-prediction, the Table 2 ablation) the output already is the velocity.
    """
    if prediction == "u":
        return out
    x_theta = bcast(c_skip, z, z.dtype) * z + bcast(c_out, z, z.dtype) * out
    return (z - x_theta) / bcast(t.clamp(min=T_CLIP), z, z.dtype)


def precondition_tangent(t: torch.Tensor, dt: torch.Tensor, prediction: str, noise_scale: float = 1.0,
                         sigma_data: float = 0.5):
    """(dc_in, dc_skip, dc_out): the tangents of :func:`precondition`'s coefficients along dt (zeros for "x" / "u",
    whose coefficients are constants; ``torch.func.jvp`` of the (B,)-sized formulas otherwise)."""
    if prediction in ("x", "u"):
        zero = torch.zeros_like(t)
        return zero, zero, zero
    _, tangents = torch.func.jvp(lambda s: precondition(s, prediction, noise_scale, sigma_data), (t,), (dt,))
    return tangents


def _linear_tangent(layer: nn.Linear | nn.Conv2d, dx: torch.Tensor) -> torch.Tensor:
    """The tangent of an affine layer: the weight applied to dx, no bias."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(dx, layer.weight, None, layer.stride, layer.padding)
    return F.linear(dx, layer.weight)


def _silu_tangent(a: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """d silu(a) = sigmoid(a) (1 + a (1 - sigmoid(a))) da."""
    sig = torch.sigmoid(a)
    return sig * (1 + a * (1 - sig)) * da


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; no bias (official torch branch, `models/`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def jvp(self, x, dx):
        """(y, dy): with s = rsqrt(mean(x^2) + eps), dy = (dx s - x s^3 mean(x dx)) * weight."""
        s = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = x * s * self.weight
        with torch.no_grad():
            dy = (dx * s - x * (s.pow(3) * (x * dx).mean(-1, keepdim=True))) * self.weight
        return y, dy


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoidal 256-d [cos, sin] (no x1000, max period 1e4) -> Linear -> SiLU -> Linear
    (official `models/embedder.py`)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def _args(self, s: torch.Tensor):
        half = self.freq_dim // 2
        f = torch.promote_types(self.mlp[0].weight.dtype, torch.float32)  # float32 (official); float64 stays float64
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=f) / half)
        return s.to(f)[:, None] * freqs[None], freqs  # (B, 128)

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, D)
        args, _ = self._args(s)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)  # cos first
        return self.mlp(emb)

    def jvp(self, s, ds):
        """(emb, d emb) along ds: d[cos a, sin a] = [-sin a, cos a] freqs ds, then the MLP's tangent."""
        args, freqs = self._args(s)
        wdtype = self.mlp[0].weight.dtype
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(wdtype)
        lin1, act, lin2 = self.mlp
        a = lin1(emb)
        out = lin2(act(a))
        with torch.no_grad():
            d_args = ds.to(args.dtype)[:, None] * freqs[None]
            d_emb = torch.cat([-torch.sin(args) * d_args, torch.cos(args) * d_args], dim=-1).to(wdtype)
            d_out = _linear_tangent(lin2, _silu_tangent(a, _linear_tangent(lin1, d_emb)))
        return out, d_out


class LabelEmbedder(nn.Module):
    """Class label -> (B, D); row ``num_classes`` is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Image -> tokens. Bottleneck (JiT): Conv p x p stride p -> d' channels, then 1x1 conv -> D; both with bias, no
    nonlinearity between. ``bottleneck_dim=0`` gives the plain linear patch embedding (pMF Table 2's ablation)."""

    def __init__(self, in_channels: int, patch_size: int, hidden_size: int, bottleneck_dim: int):
        super().__init__()
        if bottleneck_dim > 0:
            self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size)
            self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, 1)
        else:
            self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D), row-major over the grid
        x = self.proj2(self.proj1(x)) if hasattr(self, "proj1") else self.proj(x)
        return x.flatten(2).transpose(1, 2)

    def jvp(self, x, dx):
        with torch.no_grad():
            convs = (self.proj1, self.proj2) if hasattr(self, "proj1") else (self.proj,)
            for conv in convs:
                dx = _linear_tangent(conv, dx)
        return self(x), dx.flatten(2).transpose(1, 2)


def rope_2d_angles(grid: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles (N, head_dim/2) of the 2-D axial RoPE (official torch branch, `models/pmfDiT.py`).

    d = head_dim // 2; freqs = 1 / theta^(arange(0, d, 2) / d) (head_dim/4 of them). Patch (row i, col j) gets
    concat(i * freqs, j * freqs): the first head_dim/4 channel pairs rotate with the row, the rest with the column.
    """
    d = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (hd/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)  # (N, hd/2)
    return ang.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) by angle k: the complex product (x0 + i x1) e^{i a}.
    x: (B, H, N, hd); cos, sin: (N, hd/2). Real-valued and out-of-place, so forward AD and compile are safe."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Bias-free MHSA; QK-RMSNorm over head_dim (one scale shared by heads) *before* RoPE; RoPE on the last N
    (patch) tokens only; float32 softmax (official torch branch, `models/`)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "jvp_sdpa"):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        n_img = cos.shape[0]

        def heads(t):  # (B, L, D) -> (B, H, L, hd)
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        q, k = self.q_norm(q), self.k_norm(k)
        q = torch.cat([q[:, :, : L - n_img], apply_rope(q[:, :, L - n_img :], cos, sin)], dim=2)
        k = torch.cat([k[:, :, : L - n_img], apply_rope(k[:, :, L - n_img :], cos, sin)], dim=2)
        o = attention(q, k, v, self.backend)  # (B, H, L, hd)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))

    def jvp(self, x, dx, cos, sin):
        """(out, d out): the projections, QK-norm and RoPE are linear or have their own rules; attention's tangent
        is the centred closed form (float32 P; :func:`pmf.method.attention.attention_tangent`)."""
        B, L, D = x.shape
        n_img = cos.shape[0]

        def heads(t):
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        def rope(t):
            return torch.cat([t[:, :, : L - n_img], apply_rope(t[:, :, L - n_img :], cos, sin)], dim=2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        with torch.no_grad():
            dq, dk, dv = (heads(_linear_tangent(p, dx)) for p in (self.q_proj, self.k_proj, self.v_proj))
        (q, dq), (k, dk) = self.q_norm.jvp(q, dq), self.k_norm.jvp(k, dk)
        q, k = rope(q), rope(k)
        o = attention(q, k, v, self.backend)  # (B, H, L, hd)
        with torch.no_grad():
            dq, dk = rope(dq), rope(dk)  # RoPE is linear in its input
            d_o = attention_tangent(q, k, v, dq, dk, dv, o.dtype)
            d_out = _linear_tangent(self.out_proj, d_o.transpose(1, 2).reshape(B, L, D))
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D)), d_out


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def jvp(self, x, dx):
        a, b = self.w1(x), self.w3(x)
        act = F.silu(a)
        out = self.w2(act * b)
        with torch.no_grad():
            dg = _silu_tangent(a, _linear_tangent(self.w1, dx)) * b + act * _linear_tangent(self.w3, dx)
            d_out = _linear_tangent(self.w2, dg)
        return out, d_out


class Block(nn.Module):
    """x += attn(norm1 x) * attn_scale; x += mlp(norm2 x) * mlp_scale. Gates are zero-init (D,) vectors, so every
    block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, backend: str):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.attn_scale = nn.Parameter(torch.zeros(dim))
        self.mlp_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x, cos, sin, dx=None):
        """(B, L, D) -> (B, L, D); with a tangent ``dx``, (out, d out) (the explicit tangent pass; through
        ``forward`` so that FSDP2's hooks gather this block for it too)."""
        if dx is not None:
            return self._jvp(x, dx, cos, sin)
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale
        return x + self.mlp(self.norm2(x)) * self.mlp_scale

    def _jvp(self, x, dx, cos, sin):
        a, da = self.attn.jvp(*self.norm1.jvp(x, dx), cos, sin)
        x = x + a * self.attn_scale
        with torch.no_grad():
            dx = dx + da * self.attn_scale
        m, dm = self.mlp.jvp(*self.norm2.jvp(x, dx))
        with torch.no_grad():
            dx = dx + dm * self.mlp_scale
        return x + m * self.mlp_scale, dx


class FinalLayer(nn.Module):
    """RMSNorm -> Linear(D, p*p*C) with bias; weight and bias zero-init, so x_theta = 0 at init."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x):
        return self.linear(self.norm(x))

    def jvp(self, x, dx):
        n, dn = self.norm.jvp(x, dx)
        with torch.no_grad():
            d_out = _linear_tangent(self.linear, dn)
        return self.linear(n), d_out


# ----------------------------------------------------------------------------------------------------------------
# The network


class PMFDiT(nn.Module, PyTorchModelHubMixin):
    """pmfDiT. ``net(z, t, h, omega, t_min, t_max, y) -> (u, v)``.

    Args use the official hyperparameter names and meanings (``num_interval_tokens`` = k tokens for t_min and k
    for t_max, so the prefix is class + cfg + 2k + time = 8 + 4 + 4 + 4 = 20 by default); extra ones:
      bottleneck_dim: patch-embed bottleneck width d' (None: 128 if hidden_size <= 1024 else 256; 0: no bottleneck).
      v_head: build the training-only auxiliary v-head (the last ``aux_head_depth`` blocks, duplicated).
      prediction: "x" (the paper), "u" (direct u-prediction), or a pre-conditioned x form "linear" | "edm" | "scm".
      noise_scale, sigma_data: used only by the pre-conditioned forms.
      attn_backend: see :mod:`pmf.method.attention`.
      omega_max: the largest guidance scale seen in training (1 + cfg_max); the sampler warns beyond it.

    ``init_kwargs``: every constructor argument as passed, defaults included (bottleneck_dim=None stays None), which
    config.json stores: several (depth, mlp_ratio, token counts, ...) cannot be read back from the modules.
    ``pretrained_meta``: the sampling defaults and provenance the network was loaded with (empty when built here).
    """

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 16,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        num_classes: int = 1000,
        aux_head_depth: int = 8,
        num_class_tokens: int = 8,
        num_time_tokens: int = 4,
        num_cfg_tokens: int = 4,
        num_interval_tokens: int = 2,
        bottleneck_dim: int | None = None,
        v_head: bool = True,
        prediction: str = "x",
        noise_scale: float = 1.0,
        sigma_data: float = 0.5,
        attn_backend: str = "jvp_sdpa",
        omega_max: float = 8.0,
    ):
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # the arguments only
        super().__init__()
        self.init_kwargs, self.pretrained_meta = init_kwargs, {}
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError("head_dim = hidden_size/num_heads must be an integer multiple of 4 (2-D RoPE)")
        if not 0 <= aux_head_depth <= depth:
            raise ValueError(f"aux_head_depth {aux_head_depth} must lie in [0, depth={depth}]")
        if bottleneck_dim is None:
            bottleneck_dim = 128 if hidden_size <= 1024 else 256
        mlp_hidden = int(hidden_size * mlp_ratio)
        if hidden_size > 1024:  # the official torch/hsdp code rounds up to a multiple of 8 for H only
            mlp_hidden = (mlp_hidden + 7) // 8 * 8

        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_classes, self.prediction = hidden_size, num_classes, prediction
        self.noise_scale, self.sigma_data, self.omega_max = noise_scale, sigma_data, omega_max
        self.grid = input_size // patch_size
        self.num_patches = self.grid**2
        # num_interval_tokens is per endpoint, as in the official constructor: t_min and t_max get k tokens each.
        self.num_prefix = num_class_tokens + num_cfg_tokens + 2 * num_interval_tokens + num_time_tokens
        D = hidden_size

        # Learned token blocks, one per condition group; the group's embedding is broadcast-added.
        self.class_tokens = nn.Parameter(torch.empty(1, num_class_tokens, D))
        self.omega_tokens = nn.Parameter(torch.empty(1, num_cfg_tokens, D))
        self.t_min_tokens = nn.Parameter(torch.empty(1, num_interval_tokens, D))
        self.t_max_tokens = nn.Parameter(torch.empty(1, num_interval_tokens, D))
        self.time_tokens = nn.Parameter(torch.empty(1, num_time_tokens, D))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_prefix + self.num_patches, D))  # over ALL tokens

        self.x_embedder = PatchEmbed(in_channels, patch_size, D, bottleneck_dim)
        self.h_embedder = TimestepEmbedder(D)  # h = t - r
        self.omega_embedder = TimestepEmbedder(D)  # 1 - 1/omega
        self.cfg_t_start_embedder = TimestepEmbedder(D)  # t_min
        self.cfg_t_end_embedder = TimestepEmbedder(D)  # t_max
        self.y_embedder = LabelEmbedder(num_classes, D)

        def blocks(n):
            return nn.ModuleList(Block(D, num_heads, mlp_hidden, attn_backend) for _ in range(n))

        self.shared_blocks = blocks(depth - aux_head_depth)
        self.u_heads = blocks(aux_head_depth)
        self.u_final_layer = FinalLayer(D, patch_size, in_channels)
        self.has_v_head = v_head
        if v_head:
            self.v_heads = blocks(aux_head_depth)
            self.v_final_layer = FinalLayer(D, patch_size, in_channels)

        ang = rope_2d_angles(self.grid, D // num_heads)
        self.register_buffer("rope_cos", ang.cos(), persistent=False)  # derived, never in the state dict
        self.register_buffer("rope_sin", ang.sin(), persistent=False)
        self.reset_parameters()

    # -- init -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self):
        """Official init: Linear N(0, (0.32)^2 / fan_in) (paper: 0.1 / fan_in), zero bias; condition-embedder MLPs
        N(0, 1/fan_in); tokens N(0, 1/D); pos-embed N(0, 0.02^2); patch convs xavier-uniform; gates and final
        layers zero."""
        D = self.hidden_size
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.32 / math.sqrt(m.in_features))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for emb in (self.h_embedder, self.omega_embedder, self.cfg_t_start_embedder, self.cfg_t_end_embedder):
            for lin in (emb.mlp[0], emb.mlp[2]):
                nn.init.normal_(lin.weight, std=1 / math.sqrt(lin.in_features))
        for tok in (self.class_tokens, self.omega_tokens, self.t_min_tokens, self.t_max_tokens, self.time_tokens):
            nn.init.normal_(tok, std=1 / math.sqrt(D))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=1 / math.sqrt(D))
        nn.init.normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, Block):
                nn.init.zeros_(m.attn_scale)
                nn.init.zeros_(m.mlp_scale)
            elif isinstance(m, FinalLayer):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)

    # -- pieces, so a training step can run only what it needs -----------------------------------------------------
    def embed(self, z_in, h, omega, t_min, t_max, y) -> torch.Tensor:
        """Build the token sequence (B, 20 + N, D) from the (pre-scaled) image and the conditions."""
        return self._sequence(omega, t_min, t_max, y, self.h_embedder(h), self.x_embedder(z_in))

    def _sequence(self, omega, t_min, t_max, y, h_emb, patches) -> torch.Tensor:
        B = patches.shape[0]

        def group(tokens, emb):  # (1, n, D) + (B, 1, D) -> (B, n, D)
            return tokens + emb[:, None, :]

        seq = torch.cat(
            [
                group(self.class_tokens, self.y_embedder(y)),
                group(self.omega_tokens, self.omega_embedder(1 - 1 / omega)),  # omega enters as 1 - 1/omega
                group(self.t_min_tokens, self.cfg_t_start_embedder(t_min)),
                group(self.t_max_tokens, self.cfg_t_end_embedder(t_max)),
                group(self.time_tokens, h_emb),  # only h = t - r; t is not embedded
                patches,  # (B, N, D)
            ],
            dim=1,
        )
        return seq.expand(B, -1, -1) + self.pos_embed

    def embed_jvp(self, z_in, dz_in, h, dh, omega, t_min, t_max, y):
        """(sequence, its tangent): only the time tokens (through h) and the patches (through z) move; the other
        conditions, the learned tokens and the position embedding are constants."""
        h_emb, dh_emb = self.h_embedder.jvp(h, dh)
        patches, d_patches = self.x_embedder.jvp(z_in, dz_in)
        seq = self._sequence(omega, t_min, t_max, y, h_emb, patches)
        with torch.no_grad():
            B, n_time = patches.shape[0], self.time_tokens.shape[1]
            still = d_patches.new_zeros(B, self.num_prefix - n_time, self.hidden_size)
            d_seq = torch.cat([still, dh_emb[:, None, :].to(d_patches.dtype).expand(B, n_time, -1), d_patches], 1)
        return seq, d_seq

    # Activation checkpointing (``train.activation_checkpointing``): a flag, not a constructor argument, so exports
    # and checkpoints do not change. Each block runs under non-reentrant torch.utils.checkpoint when gradients are
    # being recorded: it keeps only its input and recomputes its activations in the backward.
    activation_checkpointing: bool = False

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.activation_checkpointing and torch.is_grad_enabled()
        for blk in blocks:
            x = self._checkpointed_block(blk, x) if ckpt else blk(x, self.rope_cos, self.rope_sin)
        return x

    def _checkpointed_block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        """One block under checkpointing. Under ``torch.func.jvp`` (objective.impl=reference) the input carries a
        forward-mode tangent, which cannot go through the checkpoint as it is (the recomputation, outside the dual
        level, would save fewer tensors than the original forward): its tangent is computed by a dual pass without
        autograd history (the objective never differentiates du/dt), and the primal goes through the checkpoint."""
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is None:
            return torch.utils.checkpoint.checkpoint(blk, x, self.rope_cos, self.rope_sin, use_reentrant=False)
        with torch.no_grad():
            d_out = fwAD.unpack_dual(blk(fwAD.make_dual(primal.detach(), tangent), self.rope_cos,
                                         self.rope_sin)).tangent
        out = torch.utils.checkpoint.checkpoint(blk, primal, self.rope_cos, self.rope_sin, use_reentrant=False)
        return fwAD.make_dual(out, d_out)

    def run_blocks_jvp(self, blocks: nn.ModuleList, x: torch.Tensor, dx: torch.Tensor):
        """(x, dx) through ``blocks``. Under activation checkpointing the tangent comes from a pass without history
        and the primal goes through the checkpoint (one more primal forward per block on these rows)."""
        ckpt = self.activation_checkpointing and torch.is_grad_enabled()
        for blk in blocks:
            if ckpt:
                with torch.no_grad():
                    _, dx = blk(x.detach(), self.rope_cos, self.rope_sin, dx)
                x = torch.utils.checkpoint.checkpoint(blk, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x, dx = blk(x, self.rope_cos, self.rope_sin, dx)
        return x, dx

    def trunk(self, z, t, h, omega, t_min, t_max, y) -> torch.Tensor:
        """Shared trunk output (B, 20 + N, D)."""
        c_in, _, _ = self.coefficients(t)
        return self._trunk(z, c_in, h, omega, t_min, t_max, y)

    def _trunk(self, z, c_in, h, omega, t_min, t_max, y) -> torch.Tensor:
        return self.run_blocks(self.shared_blocks, self.embed(bcast(c_in, z, z.dtype) * z, h, omega, t_min, t_max, y))

    def coefficients(self, t: torch.Tensor):
        """(c_in, c_skip, c_out) of this network's prediction form at t (:func:`precondition`)."""
        return precondition(t, self.prediction, self.noise_scale, self.sigma_data)

    def head(self, trunk_out: torch.Tensor, which: str = "u") -> torch.Tensor:
        """Run the u- or v-head on the trunk output and return its raw image output (B, C, H, W)."""
        blocks, final = (self.u_heads, self.u_final_layer) if which == "u" else (self.v_heads, self.v_final_layer)
        x = final(self.run_blocks(blocks, trunk_out)[:, self.num_prefix :])  # drop the prefix tokens
        return self.unpatchify(x)

    def u_and_tangent(self, z, t, r, omega, t_min, t_max, y, dz, dt, dr):
        """(u, du, trunk output): u = u-head velocity of (z, t, h = t - r) and its tangent along (dz, dt, dr)
        [MF Eq. 8: du/dt = v d_z u + d_t u for (dz, dt, dr) = (v, 1, 0)], by the explicit tangent pass. du carries
        no autograd history; u and the trunk output do."""
        c_in, c_skip, c_out = self.coefficients(t)
        dc_in, dc_skip, dc_out = precondition_tangent(t, dt, self.prediction, self.noise_scale, self.sigma_data)
        z_in = bcast(c_in, z, z.dtype) * z
        with torch.no_grad():
            dz_in = bcast(dc_in, z, z.dtype) * z + bcast(c_in, z, z.dtype) * dz
        s, ds = self.run_blocks_jvp(self.shared_blocks, *self.embed_jvp(z_in, dz_in, t - r, dt - dr, omega, t_min,
                                                                        t_max, y))
        x, dx = self.run_blocks_jvp(self.u_heads, s, ds)
        out, d_out = self.u_final_layer.jvp(x[:, self.num_prefix :], dx[:, self.num_prefix :])
        out, d_out = self.unpatchify(out), self.unpatchify(d_out)
        u = velocity_from_output(z, t, out, c_skip, c_out, self.prediction)
        if self.prediction == "u":
            return u, d_out, s
        with torch.no_grad():  # u = (z - x_theta) / max(t, 0.05): du = (dz - dx_theta - u d max(t, 0.05)) / max(...)
            dx_theta = (bcast(dc_skip, z, z.dtype) * z + bcast(c_skip, z, z.dtype) * dz + bcast(dc_out, z, z.dtype) * out
                        + bcast(c_out, z, z.dtype) * d_out)
            t_c = t.clamp(min=T_CLIP)
            dt_c = torch.where(t >= T_CLIP, dt, torch.zeros_like(dt))
            du = (dz - dx_theta - u * bcast(dt_c, z, z.dtype)) / bcast(t_c, z, z.dtype)
        return u, du, s

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C), each token ordered (p_row, p_col, c) -> (B, C, H, W)  (official `unpatchify`)."""
        B, p, g, C = x.shape[0], self.patch_size, self.grid, self.in_channels
        x = x.reshape(B, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, g * p, g * p)

    def to_velocity(self, z: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Raw head output -> velocity (see :func:`velocity_from_output`)."""
        _, c_skip, c_out = self.coefficients(t)
        return velocity_from_output(z, t, out, c_skip, c_out, self.prediction)

    def forward(self, z, t, h, omega, t_min, t_max, y, heads: str = "uv"):
        """z: (B, C, H, W) noisy image z_t; t, h = t - r, omega, t_min, t_max: (B,); y: (B,) int64 (num_classes =
        null). Returns (u, v), velocities of shape (B, C, H, W); v is None without a v-head or if 'v' not in heads."""
        c_in, c_skip, c_out = self.coefficients(t)  # once: the trunk's input scale and both heads' output form
        s = self._trunk(z, c_in, h, omega, t_min, t_max, y)

        def velocity(which):
            return velocity_from_output(z, t, self.head(s, which), c_skip, c_out, self.prediction)

        u = velocity("u") if "u" in heads else None
        v = velocity("v") if ("v" in heads and self.has_v_head) else None
        return u, v

    # -- the on-disk layout (pmf.method.pretrained) ----------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, meta: dict | None = None) -> Path:
        """Write ``config.json`` (:attr:`init_kwargs` and the sampling defaults), ``model.safetensors`` and
        ``README.md`` into ``save_directory``, each atomically; returns the folder. ``meta``: sampling defaults and
        provenance over those of :func:`sampling_meta` (e.g. ``{"model": "pMF-B/16", "source": "...", "omega": 7.5}``).
        """
        return pretrained.write_folder(save_directory, dict(self.init_kwargs), sampling_meta(self, meta),
                                       self.state_dict())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, cache_dir=None,
                        revision: str | None = None, token: str | None = None, **overrides):
        """The network in a folder written by :meth:`save_pretrained`, or in a Hub repo ``owner/name`` (downloaded by
        huggingface_hub; offline, one clear error). Strict load; in eval mode, on CPU; sampling defaults in
        ``pretrained_meta``. ``overrides`` replace stored kwargs that do not change the weights' shapes (e.g.
        ``attn_backend="math"``)."""
        from safetensors.torch import load_file

        folder = pretrained.resolve_folder(pretrained_model_name_or_path, cache_dir, revision, token)
        config = pretrained.read_config(folder)
        if unknown := sorted(set(config["model_kwargs"]) - set(pmfdit_kwargs())):
            raise ValueError(f"{folder / pretrained.CONFIG_NAME}: unknown PMFDiT argument(s) {unknown} in "
                             "model_kwargs; restore the file or save the network again")
        net = cls(**{**config["model_kwargs"], **overrides})
        net.load_state_dict(load_file(folder / pretrained.WEIGHTS_NAME, device="cpu"), strict=True)
        net.pretrained_meta = dict(config["meta"])  # so a re-save keeps the sampling defaults and provenance
        return net.eval()

    def push_to_hub(self, repo_id: str, *, meta: dict | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload pMF model", revision: str | None = None,
                    create_pr: bool = False):
        """:meth:`save_pretrained` into a temporary folder, then upload it to the Hub repo ``repo_id`` (created if
        missing) with huggingface_hub's ``HfApi``. Returns upload_folder's commit info."""
        import huggingface_hub

        api = huggingface_hub.HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, meta=meta)
            return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=tmp,
                                     commit_message=commit_message, revision=revision, create_pr=create_pr)


# ----------------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ModelSpec:
    """A named size: constructor kwargs plus the official noise scale and recommended 1-NFE sampling settings
    (official configs/pMF_*_config.yml and eval configs; eval omega, CFG interval, EMA half-life in kimg)."""

    kwargs: dict
    noise_scale: float = 1.0
    omega: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    ema_halflife_kimg: float | None = None


def _paper(size: str, res: int, patch: int, **kw) -> dict:
    width, depth, heads = {"B": (768, 16, 12), "L": (1024, 32, 16), "H": (1280, 48, 16)}[size]
    return dict(input_size=res, patch_size=patch, in_channels=3, hidden_size=width, depth=depth, num_heads=heads,
                num_classes=1000, aux_head_depth=8, **kw)


MODELS: dict[str, ModelSpec] = {
    # Official sizes; omega / interval / EMA are the released eval settings (B/16's 8.5 lies outside [1, 8]).
    "pMF-B/16": ModelSpec(_paper("B", 256, 16), 1.0, 8.5, 0.1, 0.7, 2000),
    "pMF-L/16": ModelSpec(_paper("L", 256, 16), 1.0, 7.0, 0.2, 0.7, 1000),
    "pMF-H/16": ModelSpec(_paper("H", 256, 16), 2.0, 7.0, 0.2, 0.6, 1000),
    "pMF-B/32": ModelSpec(_paper("B", 512, 32), 2.0, 6.5, 0.1, 0.7, 2000),
    "pMF-L/32": ModelSpec(_paper("L", 512, 32), 4.0, 7.5, 0.2, 0.6, 2000),
    "pMF-H/32": ModelSpec(_paper("H", 512, 32), 4.0, 5.5, 0.1, 0.6, 500),
    # Small CPU sizes. 28x28 grayscale (Fashion-MNIST) and 32x32 RGB.
    # The CPU demo's size: 2 shared blocks + 2 per head, and 6 prefix tokens instead of 20 (class 2 | omega 1 |
    # t_min 1 | t_max 1 | time 1): on 16 patch tokens the official 20 would be most of the sequence's cost.
    "pMF-XS/7-28": ModelSpec(dict(input_size=28, patch_size=7, in_channels=1, hidden_size=96, depth=4, num_heads=3,
                                  num_classes=10, aux_head_depth=2, bottleneck_dim=32, num_class_tokens=2,
                                  num_cfg_tokens=1, num_interval_tokens=1, num_time_tokens=1), 1.0, 4.0, 0.0, 1.0),
    "pMF-T/7-28": ModelSpec(dict(input_size=28, patch_size=7, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                                 num_classes=10, aux_head_depth=2, bottleneck_dim=32), 1.0, 3.0, 0.0, 1.0),
    "pMF-T/4-28": ModelSpec(dict(input_size=28, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                                 num_classes=10, aux_head_depth=2, bottleneck_dim=16), 1.0, 3.0, 0.0, 1.0),
    "pMF-S/4-32": ModelSpec(dict(input_size=32, patch_size=4, in_channels=3, hidden_size=256, depth=8, num_heads=4,
                                 num_classes=10, aux_head_depth=2, bottleneck_dim=32), 1.0, 3.0, 0.0, 1.0),
    # Unit-test size: seconds on a CPU.
    "pMF-tiny": ModelSpec(dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2,
                               num_classes=3, aux_head_depth=1, bottleneck_dim=8), 1.0, 2.0, 0.0, 1.0),
}


def pmfdit_kwargs() -> list[str]:
    """The keyword arguments PMFDiT accepts (what ``model.overrides`` and a saved network's kwargs may name)."""
    return [n for n, p in inspect.signature(PMFDiT.__init__).parameters.items()
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_model(name: str, **overrides) -> PMFDiT:
    """Instantiate a registered size; ``overrides`` replace constructor kwargs (e.g. v_head=False)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    spec = MODELS[name]
    kw = {"noise_scale": spec.noise_scale, **spec.kwargs, **overrides}
    return PMFDiT(**kw)


def sampling_meta(net: PMFDiT, meta: dict | None = None) -> dict:
    """The ``meta`` a save writes: ``meta`` over what the network was loaded with (``pretrained_meta``) over the
    registered size's recommended settings (``meta["model"]`` in :data:`MODELS`) over
    :data:`pmf.method.pretrained.DEFAULT_SAMPLING`; the noise scale defaults to the network's own."""
    merged = {**net.pretrained_meta, **(meta or {})}
    out = {"noise_scale": float(net.noise_scale), **pretrained.DEFAULT_SAMPLING}
    if (spec := MODELS.get(merged.get("model"))) is not None:
        out.update(noise_scale=spec.noise_scale, omega=spec.omega, t_min=spec.t_min, t_max=spec.t_max)
    return {**out, **merged}
