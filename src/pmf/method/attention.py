"""Softmax attention with a forward-mode (JVP) rule.

The fast fused kernels behind ``F.scaled_dot_product_attention`` (flash, memory-efficient, cuDNN, CPU flash) have
no forward-mode AD: ``torch.func.jvp`` through them raises. pMF's objective needs du/dt by a JVP through the whole
network, so attention must carry tangents. Three backends:

- ``"math"``: explicit ``softmax(q k^T / sqrt(d)) v`` with a float32 softmax. Plain autograd, forward and reverse
  mode; the reference.
- ``"sdpa"``: the fused kernel. Fast, but raises under a JVP.
- ``"jvp_sdpa"`` (the default): a ``torch.autograd.Function`` whose primal runs on the fused kernel and whose
  ``jvp`` uses the closed-form tangent of softmax attention. With S = q k^T / sqrt(d), P = softmax(S), O = P v:

      dS = (dq k^T + q dk^T) / sqrt(d)
      dO = P dv + (P * (dS - rowsum(P * dS))) v        (the softmax tangent dP = P * (dS - rowsum(P * dS)))

  ``P dv`` runs on the fused kernel; the centred term needs P itself and is computed in float32, only when a tangent
  is asked for, without autograd history (:func:`attention_tangent`, shared by this rule and the explicit tangent
  pass of the lean objective). The centred form never touches the rounded output O: the equivalent ``(P * dS) v -
  rowsum(P * dS) O`` subtracts two nearly equal terms and, under bf16 autocast, multiplies by O as the bf16 kernel
  rounded it. The reverse pass uses the fused kernel's backward: on CPU (float32 / float64, no autocast) the forward
  calls the CPU flash kernel directly and keeps its logsumexp, so the backward runs the kernel's own backward op;
  elsewhere the backward recomputes the fused forward under autograd and differentiates it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

BACKENDS = ("jvp_sdpa", "math", "sdpa")


def _softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32 (the official softmax precision); float64 stays float64 so tests can be exact."""
    return torch.promote_types(x.dtype, torch.float32)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention. q, k, v: (B, H, L, d) -> (B, H, L, d); softmax in float32 (official convention)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q * scale, k)  # (B, H, L, L)
    probs = torch.softmax(scores.to(_softmax_dtype(scores)), dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def _cpu_kernel_with_lse(q, k, v) -> bool:
    """Whether the CPU flash kernel can be called directly, keeping its logsumexp for the backward: plain float32 /
    float64 CPU tensors of one dtype outside autocast (under autocast the fused op's input casts must happen, so the
    public ``F.scaled_dot_product_attention`` is used and the backward recomputes it)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and q.dtype == k.dtype == v.dtype
            and not torch.is_autocast_enabled("cpu"))


def attention_tangent(q, k, v, dq, dk, dv, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dO, the tangent of softmax(q k^T / sqrt(d)) v along (dq, dk, dv) (each may be None: a zero tangent), in the
    centred closed form of the module doc: P and the centred product in float32 (float64 stays float64) with autocast
    off, ``P dv`` on the fused kernel. Built without autograd history (no_grad): tangents are never differentiated
    (the objective takes sg(du/dt)), and history would keep the float32 (B, H, L, L) temporaries alive until the
    tangent dies. Plain tensor ops, so ``torch.compile`` traces it whole (the lean objective's explicit tangent
    pass, :meth:`pmf.method.model.Attention.forward`)."""
    out_dtype = out_dtype or v.dtype
    with torch.no_grad():
        d_out = None
        if dq is not None or dk is not None:
            scale = 1.0 / math.sqrt(q.shape[-1])
            f = _softmax_dtype(q)
            # Autocast off: it would run these einsums in bf16/fp16 (the meta device has no autocast to turn off)
            with contextlib.nullcontext() if q.device.type == "meta" else torch.autocast(q.device.type, enabled=False):
                qf, kf = q.to(f) * scale, k.to(f)
                probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", qf, kf), dim=-1)
                dS = None
                if dq is not None:
                    dS = torch.einsum("bhqd,bhkd->bhqk", dq.to(f) * scale, kf)
                if dk is not None:
                    term = torch.einsum("bhqd,bhkd->bhqk", qf, dk.to(f))
                    dS = term if dS is None else dS + term
                d_probs = probs * (dS - (probs * dS).sum(-1, keepdim=True))  # (B, H, L, L), centred: no O needed
                d_out = torch.einsum("bhqk,bhkd->bhqd", d_probs, v.to(f)).to(out_dtype)
        if dv is not None:
            p_dv = F.scaled_dot_product_attention(q, k, dv)  # P dv on the fused kernel
            d_out = p_dv.to(out_dtype) if d_out is None else d_out + p_dv
        return d_out if d_out is not None else torch.zeros_like(v, dtype=out_dtype)


class _JvpSDPA(torch.autograd.Function):
    """Fused-kernel attention with an explicit forward-mode rule (:func:`attention_tangent`). Outputs (O,
    logsumexp); the logsumexp (non-differentiable, empty when not available) lets the CPU backward skip recomputing
    the forward. ``out`` is saved for the backward only on that CPU kernel path, the one that reads it."""

    @staticmethod
    def forward(q, k, v):
        if _cpu_kernel_with_lse(q, k, v):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return F.scaled_dot_product_attention(q, k, v), q.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out if lse.numel() else None, lse)
        ctx.save_for_forward(q, k, v)
        ctx.kernel_dtype = out.dtype  # what the fused kernel ran in: autocast may have cast mixed q, k, v

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v = ctx.saved_tensors
        return attention_tangent(q, k, v, dq, dk, dv, ctx.kernel_dtype), None

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if lse.numel():  # the CPU kernel's own backward from the saved output and logsumexp
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out.contiguous(), q, k, v, out, lse, 0.0, False)
        with torch.enable_grad():
            qd, kd, vd = (x.detach().requires_grad_(True) for x in (q, k, v))
            # Backward runs outside autocast: cast to the forward kernel's dtype by hand (grads return in q, k, v's)
            dt = ctx.kernel_dtype
            out = F.scaled_dot_product_attention(qd.to(dt), kd.to(dt), vd.to(dt))
            return torch.autograd.grad(out, (qd, kd, vd), grad_out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "jvp_sdpa") -> torch.Tensor:
    """Multi-head softmax attention, no mask, no dropout. q, k, v: (B, H, L, d) -> (B, H, L, d).

    Under ``torch.compile`` "jvp_sdpa" traces as the plain fused kernel, its own primal (Dynamo cannot trace an
    autograd.Function with a custom ``jvp``): compiled code takes its tangents from the explicit tangent pass
    (:func:`attention_tangent`), never from forward-mode AD."""
    if backend == "jvp_sdpa":
        if torch.compiler.is_compiling():
            return F.scaled_dot_product_attention(q, k, v)
        return _JvpSDPA.apply(q, k, v)[0]
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
