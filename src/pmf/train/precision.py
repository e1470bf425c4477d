"""Precision by capability: bf16 autocast for a step (:func:`autocast_context`), whether this CPU computes in bf16
natively (:func:`cpu_native_bf16`), the dtype of internal bf16 defaults (:func:`internal_dtype`), TF32 on CUDA
(:func:`set_tf32`) and what an out-of-memory error looks like (:func:`is_out_of_memory`).

bf16 and the JVP
----------------
Under ``torch.autocast(..., torch.bfloat16)`` the matmuls of the primal *and* of the tangent run in bf16 (autocast
casts the tangent with its primal), everything else keeps its input dtype. What keeps the pMF step stable:

- The attention tangent's ``P`` and ``P * dS`` terms in float32: :mod:`pmf.method.attention` computes them in
  ``promote_types(dtype, float32)`` whatever q, k, v are (the ``jvp_sdpa`` backend; the ``math`` backend's softmax is
  float32 too). Keep it that way: the ``rowsum(P * dS) * O`` term is a difference of nearly equal numbers.
- The x -> u conversion ``u = (z - x) / max(t, 0.05)`` and ``V = u + (t - r) du/dt`` in float32: z, t and r stay
  float32 (they are inputs, not autocast outputs), so type promotion lifts the bf16 head output to float32 before
  the division; ``1 / 0.05 = 20`` would otherwise amplify bf16's 3 significant digits.
- The time embedding's sinusoid in float32 (the model computes it in ``promote_types(weight dtype, float32)``; the
  weights stay float32 under autocast), and the losses' per-sample sums in float32 (they are reductions of float32
  tensors after the promotion above).
- Parameters, gradients and optimizer state in float32 (autocast does not touch them). No loss scaling is needed
  for bf16; fp16 would need a GradScaler, which the loop does not have, so :func:`autocast_context` refuses it.

On CPUs without native bf16 matmuls (no AVX512-BF16 / AMX) bf16 is *much slower* than float32 (a 1024^3 matmul:
3.3 s against 50 ms on a 2-core EPYC without AVX-512), so internal bf16 defaults (Muon's Newton-Schulz) run in
float32 there (:func:`internal_dtype`), and asking for bf16 on such a CPU warns once with the measured slowdown
(:func:`warn_if_slow_bf16`). :func:`cpu_native_bf16` decides it from torch's CPU feature report (AVX512-BF16, AMX-BF16,
Arm BF16), or, where torch has none, from a cached micro-benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings

import torch

PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Does this CPU compute in bf16 natively?

_CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, x86 AMX-BF16, Arm v8.6 BF16


def _matmul_ms(dtype: torch.dtype, n: int = 256, min_s: float = 0.05) -> float:
    """Milliseconds per n^3 CPU matmul in ``dtype`` on one thread (best of repeated runs over at least ``min_s``
    seconds; one thread: on a loaded machine, multi-thread timings are dominated by waiting for busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up (and the one-off packing of the BLAS library)
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < min_s:
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return best * 1e3


@functools.lru_cache(maxsize=None)
def bf16_matmul_slowdown() -> float:
    """Measured once per process: time of a 256^3 CPU matmul in bf16 / the same in float32 (> 1: bf16 is slower)."""
    return _matmul_ms(torch.bfloat16) / _matmul_ms(torch.float32)


def _cpu_features() -> dict | None:
    """torch's report of the CPU's instruction-set features (``torch.cpu.get_capabilities``), or None without one."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get is not None else None
    except Exception:  # noqa: BLE001  (an unusual platform: the callers fall back to measuring)
        return None


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> bool:
    """True when bf16 matmuls run in hardware on this CPU, cached for the process. Decided in two steps:

    1. torch's CPU feature report (``torch.cpu.get_capabilities``) has none of AVX512-BF16 / AMX-BF16 / Arm BF16: no.
    2. Otherwise a micro-benchmark decides: a 256^3 bf16 matmul no slower than 1.5x float32 (measured ratios: ~0.3
       with AVX512-BF16, 3.4 without; the benchmark also catches kernels capped below the hardware, e.g. by
       ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``; ~0.1 s, once)."""
    features = _cpu_features()
    if features is not None and not any(features.get(f) for f in _CPU_BF16_FEATURES):
        return False
    return bf16_matmul_slowdown() <= 1.5


def cpu_capability() -> str:
    """One line for logs: torch's SIMD dispatch level (``torch.backends.cpu.get_cpu_capability()``), the CPU's bf16
    features, and whether bf16 is native, e.g. "AVX512 (avx512_bf16), bf16 native"."""
    features = _cpu_features() or {}
    found = [f for f in _CPU_BF16_FEATURES if features.get(f)]
    head = f"{torch.backends.cpu.get_cpu_capability()} ({', '.join(found) or 'no bf16 features'})"
    if cpu_native_bf16():
        return f"{head}, bf16 native"
    return f"{head}, no native bf16: internal bf16 defaults run in fp32"


def internal_dtype(device: torch.device | str, preferred: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype for an internal computation whose default is bf16 (e.g. Muon's Newton-Schulz): ``preferred`` on
    accelerators and on CPUs with native bf16, float32 on other CPUs (where bf16 is emulated, ~10-60x slower)."""
    if preferred == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_native_bf16():
        return torch.float32
    return preferred


_warned_slow_bf16 = False


def warn_if_slow_bf16(device_type: str, what: str = "bf16") -> None:
    """Warn once per process when bf16 was asked for on a CPU without native bf16, with the measured slowdown."""
    global _warned_slow_bf16
    if _warned_slow_bf16 or device_type != "cpu" or cpu_native_bf16():
        return
    _warned_slow_bf16 = True
    warnings.warn(f"{what} was asked for on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}, no "
                  f"AVX512-BF16 / AMX): a bf16 matmul takes {bf16_matmul_slowdown():.1f}x the float32 time here "
                  "(measured); fp32 is faster on this machine", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _autocast(device_type: str, dtype: torch.dtype):
    if dtype == torch.bfloat16:
        warn_if_slow_bf16(device_type, "bf16 autocast (precision=bf16)")  # on entry only, not when validating
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def autocast_context(device_type: str, dtype: str | None = None):
    """A context manager for the forward (and loss) of a step: ``torch.autocast(device_type, bfloat16)`` for
    dtype "bf16" / "bfloat16", a no-op for None / "fp32" / "float32". Run ``backward`` outside it (autograd replays the
    recorded casts). fp16 is refused (it needs loss scaling; MeanFlow runs report NaNs with it). Entering a bf16
    context on a CPU without native bf16 warns once (:func:`warn_if_slow_bf16`)."""
    key = None if dtype is None else str(dtype).lower()
    if key not in (None, *PRECISIONS):
        raise ValueError(f"precision must be one of None, {', '.join(PRECISIONS)}; got {dtype!r}"
                         + (" (fp16 needs a GradScaler; use bf16)" if key in ("fp16", "float16", "half") else ""))
    target = None if key is None else PRECISIONS[key]
    if target is None:
        return contextlib.nullcontext()
    return _autocast(device_type, target)


def is_out_of_memory(e: BaseException) -> bool:
    """A device out-of-memory error, whichever layer raised it (eager allocator, a compiled kernel's launcher)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e)):
            return True
        e = e.__cause__
    return False


def set_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (``train.tf32``: inputs rounded to 10
    mantissa bits, float32 accumulation; several times faster than true fp32 on A100 / H100). Nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)
