"""Precision by capability (pmf.train.speed): whether this CPU has native bf16, the dtype of internal bf16 defaults,
and the one-time warning when bf16 is asked for on a CPU without it. The CPU's feature report is mocked."""

import warnings

import pytest
import torch

from pmf.method.model import build_model
from pmf.train import precision, speed


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(features, slowdown)``: torch reports ``features`` (None: no report) and the bf16 micro-benchmark
    measures ``slowdown`` (a callable raising means "must not be measured"). Caches and the warning flag reset."""
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)

    def set_cpu(features, slowdown):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: features)
        monkeypatch.setattr(precision, "bf16_matmul_slowdown", slowdown if callable(slowdown) else lambda: slowdown)
        precision.cpu_native_bf16.cache_clear()

    yield set_cpu
    precision.cpu_native_bf16.cache_clear()


def _not_measured():
    raise AssertionError("the micro-benchmark should not run when the feature report already says no")


def test_native_bf16_decision(cpu):
    cpu({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, _not_measured)
    assert not precision.cpu_native_bf16()
    cpu({"avx512_bf16": True}, 0.3)
    assert precision.cpu_native_bf16()
    cpu({"amx_bf16": True}, 40.0)  # the features are there but the kernels are capped (e.g. ONEDNN_MAX_CPU_ISA)
    assert not precision.cpu_native_bf16()
    cpu(None, 0.5)  # no feature report: the measurement decides
    assert precision.cpu_native_bf16()
    cpu({"bf16": True}, 0.9)  # Arm v8.6 BF16
    assert precision.cpu_native_bf16()


def test_internal_dtype_and_capability_line(cpu):
    cpu({"avx2": True}, _not_measured)
    assert precision.internal_dtype("cpu") == torch.float32
    assert precision.internal_dtype(torch.device("cuda", 0)) == torch.bfloat16  # accelerators keep bf16
    assert precision.internal_dtype("cpu", torch.float16) == torch.float16  # only the bf16 default is replaced
    line = precision.cpu_capability()
    assert line.startswith(torch.backends.cpu.get_cpu_capability()) and "no native bf16" in line
    cpu({"avx512_bf16": True}, 0.3)
    assert precision.internal_dtype("cpu") == torch.bfloat16 and "(avx512_bf16), bf16 native" in precision.cpu_capability()


def test_bf16_autocast_warns_once_on_entry_on_a_cpu_without_bf16(cpu):
    cpu({"avx2": True}, 66.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.autocast_context("cpu", "bf16")  # validating (not entering) does not warn
        with precision.autocast_context("cuda", "bf16") if torch.cuda.is_available() else precision.autocast_context("cpu"):
            pass
    with pytest.warns(RuntimeWarning, match=r"precision=bf16.*66\.0x the float32 time"):
        with precision.autocast_context("cpu", "bf16"):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # still obeyed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with precision.autocast_context("cpu", "bf16"):
            pass


def test_bf16_sampling_warns_on_a_cpu_without_bf16_and_not_with_it(cpu):
    """``pmf sample --precision bf16`` wraps the net in InferenceNet(net, "bf16"): the forward warns (once) on a
    CPU without bf16, and not on one with it."""
    net = build_model("pMF-tiny", v_head=False).eval()
    args = (torch.randn(2, 1, 8, 8), torch.ones(2), torch.ones(2), torch.ones(2), torch.zeros(2), torch.ones(2),
            torch.tensor([0, 1]))
    cpu({"avx512_bf16": True}, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        speed.InferenceNet(net, "bf16")(*args)
    cpu({"avx2": True}, 66.0)
    with pytest.warns(RuntimeWarning, match="66.0x"):
        speed.InferenceNet(net, "bf16")(*args)


def test_bf16_matmul_slowdown_is_measured():
    """The real measurement (cached) is a positive ratio; whether it is above or below 1 depends on the CPU."""
    precision.bf16_matmul_slowdown.cache_clear()
    r = precision.bf16_matmul_slowdown()
    assert 0 < r < float("inf") and precision.bf16_matmul_slowdown() == r
