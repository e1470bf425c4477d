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


@pytest.mark.slow
def test_compiled_regions_match_eager_lean_step():
    """The lean pMF step as ``train.compile`` runs it (maybe_compile(pmf_loss): real inductor-compiled blocks) equals
    the eager step on the same draws within the tolerance above, loss, metrics and every parameter gradient; the
    blocks ran compiled on the passes without tangents (guidance, r = t rows, v-head), eagerly on the forward-AD pass;
    nothing fell back. A second step with other draws (other guidance row counts) still runs compiled (dynamic
    batch, no recompile failure)."""
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
    (blocks,) = compiled_regions(fast)
    assert blocks.name == "Block.forward" and blocks.state == "compiled"
    assert blocks.installed_on == 4  # pMF-tiny: 2 shared blocks, 1 u-head block, 1 v-head block
    # per step: guidance through trunk + v-head (3 blocks), the r = t rows through trunk + u-head (3) and the v-head
    # (1) compiled; forward AD through trunk + u-head (3) eager
    assert blocks.calls == {"compiled": 14, "eager: tangents": 6, "eager: grad on": 0, "eager: fallback": 0}


def test_compiled_block_matches_eager_forward_and_backward():
    """One transformer block compiled for real (inductor, the region compile_regions installs): its output and the
    gradients of a weighted sum with respect to the input and every parameter equal the eager block's within the
    float32 tolerance above, for two batch sizes (one dynamic graph, no recompile failure), and its no-grad output
    under inference mode too. The fast check of the default suite; the whole lean step is checked (slow) above."""
    net, _, _ = _tiny()
    block, eager_block = net.shared_blocks[1], copy.deepcopy(net.shared_blocks[1])
    region = compile_regions(nn.ModuleList([block]), whole_forward=False)[0]
    cos, sin = net.rope_cos, net.rope_sin
    g = torch.Generator().manual_seed(5)
    for B in (6, 3):
        x = torch.randn(B, net.num_prefix + net.num_patches, net.hidden_size, generator=g)
        w = torch.randn(x.shape, generator=g)
        outs = []
        for blk in (block, eager_block):
            xx = x.clone().requires_grad_(True)
            out = blk(xx, cos, sin)
            grads = torch.autograd.grad((out * w).sum(), [xx, *blk.parameters()])
            outs.append((out.detach(), torch.cat([q.flatten() for q in grads])))
        (o_c, g_c), (o_e, g_e) = outs
        torch.testing.assert_close(o_c, o_e, rtol=LOSS_RTOL, atol=LOSS_RTOL * o_e.abs().max().item())
        assert ((g_c - g_e).norm() / g_e.norm()).item() <= GRAD_RTOL
    with torch.inference_mode():
        torch.testing.assert_close(block(x, cos, sin), eager_block(x, cos, sin), rtol=LOSS_RTOL,
                                   atol=LOSS_RTOL * o_e.abs().max().item())
    assert region.state == "compiled" and region.calls["compiled"] == 3 and region.calls["eager: fallback"] == 0


@pytest.mark.slow
def test_lean_contract_holds_with_compiled_regions(monkeypatch):
    """tests/test_objective.py::test_lean_matches_reference (lean == reference: guided targets, metrics and
    gradients to 1e-10 / 1e-8 in float64, five objective variants) run again with every network compiled by
    regions, the no-grad forward compiled whole too: the reference path's torch.func.jvp goes through the blocks
    eagerly, its guidance forward compiled."""
    import test_objective as T

    made = []
    plain_net = T._net

    def compiled_net(*a, **k):
        net = plain_net(*a, **k)
        compile_regions(net, whole_forward=True)
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


def test_a_failing_region_warns_once_by_name_and_runs_eagerly(monkeypatch):
    """A region whose compiled call fails (a simulated lowering error): the lean step warns exactly once, naming
    the region ("Block.forward"), returns the eager step's numbers exactly, counts the fallback calls, and later
    steps run eagerly without another warning. The no-grad forward region (whole_forward), which works, stays
    compiled."""
    def compile_failing_blocks(fn, **kwargs):
        def run(*a, **k):
            if getattr(fn, "__qualname__", "") == "Block.forward":
                raise RuntimeError("inductor: C++ compile error (simulated)")
            return fn(*a, **k)
        return run

    monkeypatch.setattr(torch, "compile", compile_failing_blocks)
    net, x, y = _tiny()
    fast = copy.deepcopy(net)
    compile_regions(fast, whole_forward=True)
    cfg = ObjectiveConfig(impl="lean")
    for seed, n_warnings in ((0, 1), (1, 0)):
        d = sample_draws(x, y, cfg, generator=torch.Generator().manual_seed(seed))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m_c, g_c = _step(fast, pmf_loss, x, y, cfg, d)
        caught = _torch_compile_warnings(w)
        assert len(caught) == n_warnings
        if n_warnings:
            assert "Block.forward" in str(caught[0].message) and "simulated" in str(caught[0].message)
        m_e, g_e = _step(net, pmf_loss, x, y, cfg, d)
        assert m_c == m_e and all(torch.equal(a, b) for a, b in zip(g_c, g_e))
    regions = {r.name: r for r in compiled_regions(fast)}
    assert regions["Block.forward"].state == "eager" and regions["Block.forward"].calls["compiled"] == 0
    assert regions["Block.forward"].calls["eager: fallback"] > 0
    assert regions["PMFDiT.forward (no grad)"].state == "compiled"


class _Breaks(nn.Module):
    def forward(self, x):
        x = x * 2
        torch._dynamo.graph_break()  # Dynamo would split here: compiled piece, eager gap, compiled piece
        return x + 1


def test_graph_break_is_a_loud_fallback_not_a_silent_split():
    """A region whose forward has a graph break (real Dynamo): compiled with fullgraph, it fails at the first call,
    warns once naming the region and runs eagerly, instead of silently running partly compiled."""
    import torch._dynamo

    mods = nn.ModuleList([_Breaks(), _Breaks()])
    (region,) = compile_regions(mods, whole_forward=False)
    x = torch.arange(3.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = [m(x) for m in mods]
    caught = _torch_compile_warnings(w)
    assert len(caught) == 1 and "_Breaks.forward" in str(caught[0].message)
    assert all(torch.equal(o, x * 2 + 1) for o in outs)
    assert region.state == "eager" and region.calls == {"compiled": 0, "eager: tangents": 0, "eager: grad on": 0,
                                                        "eager: fallback": 2}


def test_state_dict_keys_unchanged_and_round_trip(monkeypatch):
    """compile_regions adds no parameter, buffer or child: the state-dict keys are the eager model's, a compiled
    model's state dict loads strictly into an eager model and back, and both compute the same outputs. Deep copies
    (an EMA copy) run on their own weights; remove_regions restores the class forward."""
    monkeypatch.setattr(torch, "compile", _passthrough_compile([]))
    net, x, _ = _tiny()
    keys = list(net.state_dict())
    fast = copy.deepcopy(net)
    compile_regions(fast, whole_forward=True)
    assert list(fast.state_dict()) == keys and list(fast.parameters()) != []
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in net.named_parameters()]

    B = x.shape[0]
    t, h, om = torch.full((B,), 0.6), torch.full((B,), 0.2), torch.full((B,), 2.0)
    lo, hi, y = torch.zeros(B), torch.ones(B), torch.arange(B) % 3
    args = (x, t, h, om, lo, hi, y)

    eager = build_model("pMF-tiny")
    eager.load_state_dict(fast.state_dict(), strict=True)  # compiled -> eager
    with torch.no_grad():
        for a, b in zip(eager(*args), fast(*args)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        fresh = build_model("pMF-tiny")
        compile_regions(fresh, whole_forward=True)
        fresh.load_state_dict(eager.state_dict(), strict=True)  # eager -> compiled
        for a, b in zip(fresh(*args), eager(*args)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

        twin = copy.deepcopy(fast)  # the regions are shared, each block's forward is bound to the copy's block
        for p in twin.parameters():
            p.mul_(0.5)
        assert compiled_regions(twin) == compiled_regions(fast)
        assert twin.shared_blocks[0].forward.args[0] is twin.shared_blocks[0]
        u_twin, u_fast = twin(*args)[0], fast(*args)[0]
        assert not torch.allclose(u_twin, u_fast)
        ref = build_model("pMF-tiny")
        ref.load_state_dict(twin.state_dict())
        torch.testing.assert_close(u_twin, ref(*args)[0], rtol=0, atol=0)

    remove_regions(fast)
    assert compiled_regions(fast) == [] and "forward" not in fast.shared_blocks[0].__dict__
    assert compile_regions(twin) == compiled_regions(twin)  # idempotent: the regions already there


def test_maybe_compile_of_a_loss_compiles_regions_not_the_loss(monkeypatch):
    """``train.compile``'s wrapper (maybe_compile(pmf_loss)) never runs the loss compiled whole: called with the
    network first, it installs the network's block region once (on every block) and runs the loss eagerly; called
    with a tensor first it keeps the whole-function compile."""
    compiled = []
    monkeypatch.setattr(torch, "compile", _passthrough_compile(compiled))
    net, x, y = _tiny()
    loss_fn = maybe_compile(pmf_loss, True)
    cfg = ObjectiveConfig()
    for seed in (0, 1):
        loss_fn(net, x, y, cfg, torch.Generator().manual_seed(seed))
    assert pmf_loss not in compiled
    assert [r.name for r in compiled_regions(net)] == ["Block.forward"]
    g = maybe_compile(torch.sin, True)
    torch.testing.assert_close(g(x), torch.sin(x))
    assert compiled[-1] is torch.sin and speed.compiled_regions(net)[0].installed_on == 4  # installed once


def test_activation_checkpointing_recomputes_through_regions(monkeypatch):
    """Under ``activation_checkpointing`` the backward recomputes each block through its region, and checkpointing
    stops that recomputation early by raising through it: that is control flow, not a compile failure (no warning,
    no fallback), and the step equals the eager checkpointed step exactly (pass-through compile). A real inductor
    run of the same case (measured: gradient within 1e-7 relative) is what ``train.compile`` +
    ``train.activation_checkpointing`` run."""
    monkeypatch.setattr(torch, "compile", _passthrough_compile([]))
    net, x, y = _tiny()
    net.activation_checkpointing = True
    fast = copy.deepcopy(net)
    (blocks,) = compile_regions(fast, whole_forward=False)
    cfg = ObjectiveConfig(impl="lean")
    d = sample_draws(x, y, cfg, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        m_c, g_c = _step(fast, pmf_loss, x, y, cfg, d)
    m_e, g_e = _step(net, pmf_loss, x, y, cfg, d)
    assert m_c == m_e and all(torch.equal(a, b) for a, b in zip(g_c, g_e))
    assert blocks.state == "compiled" and blocks.calls["eager: fallback"] == 0
