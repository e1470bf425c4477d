"""Regional compile (pmf.train.speed.compile_regions, what ``train.compile`` runs): the compiled blocks and the
compiled no-grad forward give the eager loss and gradients within float rounding; the passes with tangents run
eagerly by design and are counted as such; a region that fails to compile says so once, by name, and runs eagerly;
state-dict keys do not change (checkpoints move between compiled and eager models); deep copies (EMA) compute with
their own weights. No test here asserts a time (benchmarks/step.py --compile-regions measures the gain)."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import pmf.train.speed as speed
from pmf.model import build_model
from pmf.objective import ObjectiveConfig, pmf_loss, sample_draws
from pmf.train.speed import compile_regions, compiled_regions, maybe_compile, remove_regions

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _tiny(dtype=torch.float32, seed=0):
    """pMF-tiny with every parameter perturbed (zero-init gates and final layers would make the blocks identities
    and the outputs 0, hiding any difference) and a batch of 16 with labels."""
    torch.manual_seed(seed)
    net = build_model("pMF-tiny").to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    x = (torch.rand(16, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1)
    y = torch.randint(0, 3, (16,), generator=g)
    return net, x, y


def _step(net, loss_fn, x, y, cfg, draws):
    net.zero_grad(set_to_none=True)
    loss, m = loss_fn(net, x, y, cfg, draws=draws)
    loss.backward()
    return {k: float(v) for k, v in m.items()}, [p.grad.clone() for p in net.parameters()]


def _passthrough_compile(calls):
    """A stand-in for torch.compile that runs the function as it is and records each call (no compile time)."""
    def fake(fn, **kwargs):
        def run(*a, **k):
            calls.append(fn)
            return fn(*a, **k)
        return run
    return fake


def _torch_compile_warnings(w):
    return [x for x in w if issubclass(x.category, RuntimeWarning) and "torch.compile" in str(x.message)]


# float32 tolerances for compiled vs eager: inductor fuses RMSNorm / RoPE / SwiGLU / gates and reorders their sums
# (and may pick other matmul blockings), so results differ by float32 rounding (eps 1.2e-7) accumulated over a few
# blocks and the loss's reductions: expect ~1e-6 relative. Stated: metrics within 1e-5 relative, the gradient within
# 1e-4 in norm (a wrong graph, e.g. a missing gate or a dropped RoPE, is off by O(1)). Measured: ~1e-7 / ~1e-6.
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def test_compiled_regions_match_eager_lean_step():
    """The lean pMF step (loss, metrics, every parameter gradient) with real inductor-compiled regions equals the
    eager step on the same draws within the tolerance above; the blocks ran compiled on the passes without tangents
    (r = t rows, v-head), eagerly on the forward-AD pass; the guidance forward ran compiled whole; nothing fell back.
    A second step with other draws (other guidance row counts) still runs compiled (dynamic batch, no failure)."""
    net, x, y = _tiny()
    fast = copy.deepcopy(net)
    cfg = ObjectiveConfig(impl="lean")
    loss_fn = maybe_compile(pmf_loss, True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for seed in (0, 1):
            d = sample_draws(x, y, cfg, generator=torch.Generator().manual_seed(seed))
            m_e, g_e = _step(net, pmf_loss, x, y, cfg, d)
            m_c, g_c = _step(fast, loss_fn, x, y, cfg, d)
            for k in m_e:
                assert abs(m_c[k] - m_e[k]) <= LOSS_RTOL * abs(m_e[k]), (seed, k, m_c[k], m_e[k])
            g_e, g_c = torch.cat([g.flatten() for g in g_e]), torch.cat([g.flatten() for g in g_c])
            assert ((g_c - g_e).norm() / g_e.norm()).item() <= GRAD_RTOL
    assert _torch_compile_warnings(w) == []
    regions = {r.name: r for r in compiled_regions(fast)}
    blocks, whole = regions["Block.forward"], regions["PMFDiT.forward (no grad)"]
    assert blocks.state == whole.state == "compiled"
    assert blocks.installed_on == 4  # pMF-tiny: 2 shared blocks, 1 u-head block, 1 v-head block
    # per step: the r = t rows through trunk + u-head (3 blocks) and the v-head (1) compiled; forward AD (3) eager;
    # the guidance pass's blocks run inside the compiled whole forward (not counted as block calls)
    assert blocks.calls == {"compiled": 8, "eager: tangents": 6, "eager: grad on": 0, "eager: fallback": 0}
    assert whole.calls["compiled"] == 2 and whole.calls["eager: fallback"] == 0


@pytest.mark.slow
def test_lean_contract_holds_with_compiled_regions(monkeypatch):
    """tests/test_objective.py::test_lean_matches_reference (lean == reference: guided targets, metrics and
    gradients to 1e-10 / 1e-8 in float64, five objective variants) run again with every network compiled by
    regions: the reference path's torch.func.jvp goes through the blocks eagerly, its guidance forward compiled."""
    import test_objective as T

    made = []
    plain_net = T._net

    def compiled_net(*a, **k):
        net = plain_net(*a, **k)
        compile_regions(net)
        made.append(net)
        return net

    monkeypatch.setattr(T, "_net", compiled_net)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would fail the test
        T.test_lean_matches_reference()
    regions = {r.name: r for r in compiled_regions(made[0])}
    assert regions["Block.forward"].calls["compiled"] > 0 and regions["Block.forward"].calls["eager: tangents"] > 0
    assert regions["PMFDiT.forward (no grad)"].calls["compiled"] > 0


@pytest.mark.parametrize("impl", ["lean", "reference"])
def test_tangent_passes_run_eagerly_plain_passes_compiled(monkeypatch, impl):
    """With a pass-through stand-in for torch.compile (blocks only, so every block call is counted): every block
    call that carries a tangent (lean: forward-AD duals; reference: torch.func.jvp's wrapped tensors) goes to the
    eager forward, every other block call to the compiled one; the numbers are the eager ones exactly."""
    compiled_calls = []
    monkeypatch.setattr(torch, "compile", _passthrough_compile(compiled_calls))
    net, x, y = _tiny()
    fast = copy.deepcopy(net)
    (blocks,) = compile_regions(fast, whole_forward=False)
    cfg = ObjectiveConfig(impl=impl)
    d = sample_draws(x, y, cfg, generator=torch.Generator().manual_seed(0))
    m_e, g_e = _step(net, pmf_loss, x, y, cfg, d)
    m_c, g_c = _step(fast, pmf_loss, x, y, cfg, d)
    assert m_c == m_e and all(torch.equal(a, b) for a, b in zip(g_c, g_e))
    trunk, u_head, v_head = len(fast.shared_blocks), len(fast.u_heads), len(fast.v_heads)
    assert blocks.installed_on == trunk + u_head + v_head
    guidance = trunk + v_head  # one batched no-grad call through trunk + v-head (both impls)
    if impl == "lean":  # r = t rows: trunk + u-head, then the v-head on every row, all plain; forward AD: trunk + u
        expect = {"compiled": guidance + trunk + u_head + v_head, "eager: tangents": trunk + u_head}
    else:  # torch.func.jvp over the whole network (u- and v-head): every block with a tangent
        expect = {"compiled": guidance, "eager: tangents": trunk + u_head + v_head}
    assert blocks.calls == {**expect, "eager: grad on": 0, "eager: fallback": 0}
    assert len(compiled_calls) == expect["compiled"]
