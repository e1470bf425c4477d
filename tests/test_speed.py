"""pmf.train.speed: torch.compile falls back to eager (with one warning) when compiling or a compiled call fails, the
result is the eager one and the failed call's random draws are replayed; bf16 autocast of the lean pMF step stays within
a stated tolerance of float32. No test
here asserts a time (timings live in benchmarks/step.py)."""

import copy
import warnings

import pytest
import torch

from pmf.method.model import build_model
from pmf.method.objective import ObjectiveConfig, pmf_loss, sample_draws
import pmf.train.speed as speed
from pmf.train.speed import CompiledModule, maybe_compile
from pmf.train.precision import autocast_context


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def f(x):
    return torch.sin(x) * 2 + x


def _raising_compile(*args, **kwargs):
    raise RuntimeError("backend compiler failed (simulated)")


def _compile_that_fails_on_call(fn, **kwargs):
    def broken(*a, **k):
        raise RuntimeError("inductor: C++ compile error (simulated)")

    return broken


def _caught(fn, *args):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [x for x in w if issubclass(x.category, RuntimeWarning) and "torch.compile" in str(x.message)]


def test_disabled_returns_the_object_itself():
    net = torch.nn.Linear(2, 2)
    assert maybe_compile(f, False) is f and maybe_compile(net, False) is net


def test_fallback_when_torch_compile_raises(monkeypatch):
    """torch.compile itself raises: maybe_compile warns once (at wrap time) and every call gives f's result."""
    monkeypatch.setattr(torch, "compile", _raising_compile)
    g, w = _caught(maybe_compile, f, True)
    assert len(w) == 1 and "simulated" in str(w[0].message)
    x = torch.linspace(-2, 2, 7)
    out, w2 = _caught(g, x)
    torch.testing.assert_close(out, f(x), rtol=0, atol=0)
    assert w2 == []


def test_fallback_when_first_call_fails(monkeypatch):
    """The compiled callable raises on its first call (a lowering / C++ build error): that call returns the eager
    result with one warning; later calls run eagerly without warning."""
    monkeypatch.setattr(torch, "compile", _compile_that_fails_on_call)
    g = maybe_compile(f, True)
    x = torch.linspace(-2, 2, 7)
    out, w = _caught(g, x)
    torch.testing.assert_close(out, f(x), rtol=0, atol=0)
    assert len(w) == 1 and "failed" in str(w[0].message)
    out2, w2 = _caught(g, x + 1)
    torch.testing.assert_close(out2, f(x + 1), rtol=0, atol=0)
    assert w2 == [] and g.state == "eager"


def test_fallback_after_working_calls(monkeypatch):
    """A compiled callable that works, then fails in a new situation (a recompile for a new shape, a forward-AD
    call): that call and every later one run eagerly, with one warning."""
    def fake_compile(fn, **kwargs):
        def run(x):
            if x.shape[0] > 3:
                raise RuntimeError("recompile failed (simulated)")
            return fn(x)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    g = maybe_compile(f, True)
    x = torch.linspace(-1, 1, 3)
    out, w = _caught(g, x)
    assert w == [] and g.state == "compiled"
    out, w = _caught(g, torch.ones(5))
    torch.testing.assert_close(out, f(torch.ones(5)), rtol=0, atol=0)
    assert len(w) == 1 and g.state == "eager"
    _, w = _caught(g, x)
    assert w == []


def noisy(x, gen, per_sample):
    """Draws from a generator argument, from a PerSampleGenerator-like object and from the global RNG."""
    return (x + torch.randn(x.shape, generator=gen) + torch.stack([torch.rand((), generator=q) for q in
                                                                   per_sample.generators]) + torch.rand(x.shape))


class _PerSample:
    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]


def test_fallback_replays_the_random_draws(monkeypatch):
    """The compiled call draws from the generators (and the global RNG), then fails: the eager re-run starts from
    the same random state, so the result equals an eager call on fresh generators with the same seeds."""
    def fake_compile(fn, **kwargs):
        def run(x, gen, per_sample):
            fn(x, gen, per_sample)  # consumes random numbers ...
            raise RuntimeError("lowering failed (simulated)")  # ... then fails
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    g = maybe_compile(noisy, True)
    x = torch.zeros(3)
    torch.manual_seed(5)
    out, w = _caught(g, x, torch.Generator().manual_seed(1), _PerSample([7, 8, 9]))
    torch.manual_seed(5)
    expected = noisy(x, torch.Generator().manual_seed(1), _PerSample([7, 8, 9]))
    assert len(w) == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_compiled_path_is_used_when_it_works(monkeypatch):
    """When the compiled callable works it is used for every call (here a stand-in that counts its calls)."""
    calls = []

    def fake_compile(fn, **kwargs):
        def run(*a, **k):
            calls.append(1)
            return fn(*a, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    g = maybe_compile(f, True)
    x = torch.ones(3)
    for _ in range(3):
        torch.testing.assert_close(g(x), f(x))
    assert len(calls) == 3 and g.state == "compiled"


def test_module_fallback_keeps_outputs_attributes_and_keys(monkeypatch):
    """A module whose compile fails: the wrapper's forward equals the module's, its other methods and attributes
    are the module's, and its state-dict keys are the module's with the ``_orig_mod.`` prefix torch.compile uses."""
    monkeypatch.setattr(torch, "compile", _raising_compile)
    torch.manual_seed(0)
    net = build_model("pMF-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        wrapped = maybe_compile(net, True)
    assert isinstance(wrapped, CompiledModule)
    B = 2
    z = torch.randn(B, 1, 8, 8)
    t, h, om = torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.0]), torch.tensor([1.0, 2.0])
    lo, hi, y = torch.zeros(B), torch.ones(B), torch.tensor([0, 3])
    for a, b in zip(wrapped(z, t, h, om, lo, hi, y), net(z, t, h, om, lo, hi, y)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert wrapped.trunk == net.trunk and wrapped.num_classes == net.num_classes and wrapped.has_v_head
    assert list(wrapped.state_dict()) == ["_orig_mod." + k for k in net.state_dict()]
    assert list(wrapped.parameters()) == list(net.parameters())


def test_autocast_context_choices():
    assert not torch.is_autocast_enabled("cpu")
    for off in (None, "fp32", "float32"):
        with autocast_context("cpu", off):
            assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    for bad in ("fp16", "int8"):
        with pytest.raises(ValueError):
            autocast_context("cpu", bad)


def _tiny_perturbed():
    torch.manual_seed(0)
    net = build_model("pMF-tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 3, (16,), generator=g)
    return net, x, y


# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per op); through a 3-block net the per-element
# errors average out in the summed losses. Stated tolerance: loss_u, loss_v within 2% of float32, the gradient within
# 5% in norm (cosine > 0.998). Measured on this case: ~6e-5 and ~6e-4 for the losses, 3.5e-3 for the gradient.
LOSS_RTOL, GRAD_RTOL = 2e-2, 5e-2


@pytest.mark.parametrize("impl", ["lean", "reference"])
def test_bf16_autocast_close_to_fp32(impl):
    """The pMF step (loss, metrics, parameter gradients) under bf16 autocast equals the float32 step within the
    tolerance above, on pMF-tiny with perturbed weights and the same draws; the matmuls really ran in bf16 (the
    results are not bitwise equal) and the gradients stay float32."""
    net, x, y = _tiny_perturbed()
    cfg = ObjectiveConfig(impl=impl)
    d = sample_draws(x, y, cfg, generator=torch.Generator().manual_seed(0))
    res = {}
    for precision in (None, "bf16"):
        net.zero_grad(set_to_none=True)
        with autocast_context("cpu", precision):
            loss, m = pmf_loss(net, x, y, cfg, draws=d)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        assert grads.dtype == torch.float32 and torch.isfinite(grads).all()
        res[precision] = ({k: float(v) for k, v in m.items()}, grads)
    (m32, g32), (m16, g16) = res[None], res["bf16"]
    for k in ("loss_u", "loss_v", "loss"):
        assert abs(m16[k] - m32[k]) <= LOSS_RTOL * abs(m32[k]), (k, m16[k], m32[k])
    rel = ((g16 - g32).norm() / g32.norm()).item()
    assert 0 < rel <= GRAD_RTOL, rel


def test_speed_and_precision_import_nothing_from_the_loop():
    """precision.py is a leaf (torch only) and speed.py imports only it, so the loop, the CLI and benchmarks can
    import either."""
    import ast
    import inspect

    from pmf.train import precision

    def pmf_imports(module) -> set:
        tree = ast.parse(inspect.getsource(module))
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return {m for m in mods if m and m.startswith("pmf")}

    assert pmf_imports(precision) == set()
    assert pmf_imports(speed) == {"pmf.train.precision"}


def _sampling_inputs(net, B=4):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(B, net.in_channels, net.input_size, net.input_size, generator=g)
    return noise, torch.tensor([0, 1, 2, 3])[:B] % (net.num_classes + 1)


def test_inference_net_fp32_is_the_network_and_keeps_its_interface():
    """Without bf16 or compile the wrapper computes exactly what the network does; attributes and state-dict keys
    are the network's (``net.`` prefix), so sample() and the exporters take it unchanged."""
    from pmf.method.sampler import sample

    torch.manual_seed(0)
    net = build_model("pMF-tiny", v_head=False).eval()
    fast = speed.InferenceNet(net)
    noise, y = _sampling_inputs(net)
    for steps in (1, 2):
        torch.testing.assert_close(sample(fast, noise, y, steps, omega=1.5), sample(net, noise, y, steps, omega=1.5),
                                   rtol=0, atol=0)
    assert fast.num_classes == net.num_classes and fast.input_size == net.input_size
    assert list(fast.state_dict()) == ["net." + k for k in net.state_dict()]
    with pytest.raises(ValueError, match="fp16"):
        speed.InferenceNet(net, "fp16")


def test_inference_net_bf16_returns_float32_close_to_fp32():
    """bf16 autocast: the velocity comes back float32 (x -> u divides float32 z by float32 t) and the 1-NFE images
    agree with float32 to bf16's ~3 significant digits (scale of the outputs ~1)."""
    from pmf.method.sampler import sample

    torch.manual_seed(0)
    net = build_model("pMF-tiny", v_head=False).eval()
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised gates / output layer would make the test trivial
            p.add_(0.1 * torch.randn_like(p))
    noise, y = _sampling_inputs(net)
    ref = sample(net, noise, y, 1, omega=1.5)
    out = sample(speed.InferenceNet(net, "bf16"), noise, y, 1, omega=1.5)
    assert out.dtype == torch.float32
    assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.slow  # inductor compiles the frozen network (~30 s)
def test_inference_net_compiled_with_freezing_matches_eager():
    """torch.compile with inductor weight freezing (or its eager fallback, should compiling fail here) gives the
    eager network's samples to float32 rounding."""
    from pmf.method.sampler import sample

    torch.manual_seed(0)
    net = build_model("pMF-tiny", v_head=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    noise, y = _sampling_inputs(net)
    ref = sample(net, noise, y, 1, omega=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = sample(speed.InferenceNet(copy.deepcopy(net).requires_grad_(False), compile=True), noise, y, 1,
                     omega=1.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
