"""pmf.train.optim: Muon/Adam grouping, Muon's orthogonalised update, optax Nesterov Adam, strict state round trips,
lr schedule keyed to images, and EMA half-life algebra independent of batch size."""

import io
import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from pmf.method.model import build_model
from pmf.train import precision
from pmf.train.ema import EMA, EMASpec, ema_beta
from pmf.train.optim import (
    MuonWithAdam,
    BatchedMuon,
    NesterovAdam,
    OptimConfig,
    build_optimizer,
    lr_at,
    param_groups,
    set_lr,
)


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _fake_grads(model, step):
    """Deterministic gradients that depend on the weights and the step, like a real loss would."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.sin(3 * p.detach()) + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Grouping


def test_every_pmfdit_param_in_exactly_one_group():
    net = build_model("pMF-tiny")
    muon, adam = param_groups(net)
    ids = [id(p) for _, p in muon + adam]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters()}
    muon_names = {n for n, _ in muon}
    adam_names = {n for n, _ in adam}

    # Every nn.Linear weight (2-D) goes to Muon, nothing else does.
    linear_weights = {f"{mn}.weight" for mn, m in net.named_modules() if isinstance(m, nn.Linear)}
    assert muon_names == linear_weights
    assert all(p.ndim == 2 for _, p in muon)
    for n in ["shared_blocks.0.attn.q_proj.weight", "shared_blocks.0.mlp.w2.weight", "h_embedder.mlp.0.weight",
              "u_final_layer.linear.weight", "v_final_layer.linear.weight"]:
        assert n in muon_names

    # The label-embedding table is 2-D in torch but 3-D in Flax, hence Adam (official `utils/trainstate_util.py`).
    assert "y_embedder.embedding_table.weight" in adam_names
    assert dict(adam)["y_embedder.embedding_table.weight"].ndim == 2
    for n in ["class_tokens", "time_tokens", "pos_embed", "x_embedder.proj1.weight", "x_embedder.proj2.weight",
              "x_embedder.proj1.bias", "u_final_layer.linear.bias", "h_embedder.mlp.0.bias",
              "shared_blocks.0.norm1.weight", "shared_blocks.0.attn.q_norm.weight", "u_final_layer.norm.weight",
              "shared_blocks.0.attn_scale", "shared_blocks.0.mlp_scale"]:
        assert n in adam_names, n

    opt = build_optimizer(net, OptimConfig())
    assert isinstance(opt, MuonWithAdam) and isinstance(opt, torch.optim.Optimizer)
    assert [len(g["params"]) for g in opt.param_groups] == [len(muon), len(adam)]
    assert sum(len(g["params"]) for g in build_optimizer(net, OptimConfig(name="adam")).param_groups) == len(ids)


# ----------------------------------------------------------------------------------------------------------------
# Muon


def _newton_schulz(m: np.ndarray, steps=5, eps=1e-8) -> np.ndarray:
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])  # tall: scaled by sqrt(3); wide: by 1
def test_muon_update_is_scaled_newton_schulz_of_nesterov_momentum(shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lr, mu = 0.02, 0.95
    opt = build_optimizer(lin, OptimConfig(lr=lr))
    assert isinstance(opt, torch.optim.Muon)
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))
    buf = np.zeros(shape)
    for step in range(2):
        g = torch.randn(shape)
        lin.weight.grad = g.clone()
        before = lin.weight.detach().double().numpy().copy()
        opt.step()
        delta = (before - lin.weight.detach().double().numpy()) / (lr * scale)
        buf = mu * buf + (1 - mu) * g.double().numpy()  # torch's momentum (an EMA); NS removes the scale
        expected = _newton_schulz((1 - mu) * g.double().numpy() + mu * buf)  # Nesterov look-ahead
        # torch runs Newton-Schulz in bfloat16: agreement to ~1 %.
        assert np.linalg.norm(delta - expected) / np.linalg.norm(expected) < 3e-2
        if step == 0:  # first step: direction of the gradient itself, approximately orthogonalised
            assert np.linalg.norm(_newton_schulz(g.double().numpy()) - expected) < 1e-6
            sv = np.linalg.svd(delta, compute_uv=False)
            assert sv.min() > 0.5 and sv.max() < 1.3


def _stack_of_linears():
    # Three (16, 48) matrices (one batch), two (48, 16) (tall: transposed, another batch), one (8, 8): batches of
    # 3, 2 and 1 matrices must give what each matrix gives alone.
    shapes = [(16, 48), (48, 16), (16, 48), (8, 8), (48, 16), (16, 48)]
    return nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)


def test_batched_muon_equals_per_matrix_newton_schulz_in_float64():
    torch.manual_seed(0)
    net = _stack_of_linears().double()
    lr, mu = 0.01, 0.95
    opt = BatchedMuon(list(net.parameters()), lr=lr, momentum=mu, nesterov=True, weight_decay=0.0,
                      ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-8, adjust_lr_fn="original",
                      ns_dtype=torch.float64)
    bufs = [np.zeros(tuple(p.shape)) for p in net.parameters()]
    for _ in range(3):
        before = [p.detach().numpy().copy() for p in net.parameters()]
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        grads = [p.grad.numpy().copy() for p in net.parameters()]
        opt.step()
        for k, p in enumerate(net.parameters()):
            bufs[k] = mu * bufs[k] + (1 - mu) * grads[k]
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            # eps=0: torch divides by max(||U||, eps), optax (the helper's default) by ||U|| + eps
            expected = before[k] - lr * scale * _newton_schulz((1 - mu) * grads[k] + mu * bufs[k], eps=0.0)
            np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-12)


def test_batched_muon_matches_torch_muon_and_shares_its_state():
    torch.manual_seed(0)
    net_a, kw = _stack_of_linears(), dict(lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    net_b = copy.deepcopy(net_a)
    # ns_dtype=bf16 as torch's (the default would be float32 on a CPU without native bf16)
    opt_a, opt_b = torch.optim.Muon(net_a.parameters(), **kw), BatchedMuon(net_b.parameters(), **kw,
                                                                            ns_dtype=torch.bfloat16)
    for _ in range(3):
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        before = [p.detach().clone() for p in net_a.parameters()]
        opt_a.step(), opt_b.step()
        for p0, pa, pb in zip(before, net_a.parameters(), net_b.parameters()):
            da, db = pa.detach() - p0, pb.detach() - p0
            assert float((da - db).norm() / da.norm()) < 2e-2  # both run Newton-Schulz in bfloat16
    # The same state layout: torch's Muon state loads into BatchedMuon and continues identically in float64.
    sd = opt_a.state_dict()
    fresh = BatchedMuon(copy.deepcopy(net_a).parameters(), **kw)
    fresh.load_state_dict(sd)
    assert all(torch.equal(fresh.state[p]["momentum_buffer"], opt_a.state[q]["momentum_buffer"])
               for p, q in zip(fresh.param_groups[0]["params"], opt_a.param_groups[0]["params"]))


@pytest.fixture
def cpu_features(monkeypatch):
    """Set what torch reports about the CPU (``torch.cpu.get_capabilities``): ``cpu_features(avx512_bf16=False)``.
    The capability cache and the one-time warning are reset around the test."""
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    monkeypatch.setattr(precision, "bf16_matmul_slowdown", lambda: 66.0)  # the measurement, not what is tested here
    precision.cpu_native_bf16.cache_clear()

    def set_features(**features):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, **features})
        precision.cpu_native_bf16.cache_clear()

    yield set_features
    precision.cpu_native_bf16.cache_clear()


def _muon_step_dtypes(monkeypatch, **kw) -> tuple[set, list[torch.Tensor]]:
    """One BatchedMuon step on the stack of linears: (dtypes Newton-Schulz ran in, parameter updates)."""
    torch.manual_seed(0)
    net = _stack_of_linears()
    opt = BatchedMuon(net.parameters(), lr=0.02, weight_decay=0.0, adjust_lr_fn="original", **kw)
    seen, orig = set(), BatchedMuon.orthogonalize

    def spy(self, mats, group):
        out = orig(self, mats, group)
        seen.update(o.dtype for o in out)
        return out

    monkeypatch.setattr(BatchedMuon, "orthogonalize", spy)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    monkeypatch.setattr(BatchedMuon, "orthogonalize", orig)
    return seen, [p.detach() - b for p, b in zip(net.parameters(), before)]


def test_muon_newton_schulz_runs_in_fp32_on_a_cpu_without_bf16(cpu_features, monkeypatch):
    """The default ns_dtype follows the capability: float32 on a CPU reported without AVX512-BF16 / AMX-BF16,
    bfloat16 on one with it (and on CUDA whatever the CPU); the two updates agree within bf16 rounding, and the
    float32 one is the closer to a float64 Newton-Schulz."""
    cpu_features(avx512_bf16=False, amx_bf16=False)
    dtypes32, upd32 = _muon_step_dtypes(monkeypatch)
    assert dtypes32 == {torch.float32}
    assert precision.internal_dtype("cuda") == torch.bfloat16 and precision.internal_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "bf16_matmul_slowdown", lambda: 0.3)  # what a native-bf16 CPU measures
    cpu_features(avx512_bf16=True)
    dtypes16, upd16 = _muon_step_dtypes(monkeypatch)
    assert dtypes16 == {torch.bfloat16}
    _, upd64 = _muon_step_dtypes(monkeypatch, ns_dtype=torch.float64)
    for u32, u16, u64 in zip(upd32, upd16, upd64):
        assert float((u16 - u32).norm() / u32.norm()) < 3e-2  # bf16 (8-bit mantissa) through 5 iterations
        assert float((u32 - u64).norm() / u64.norm()) < 1e-4 < float((u16 - u64).norm() / u64.norm())


def test_explicit_bf16_newton_schulz_warns_once_on_a_cpu_without_bf16(cpu_features, monkeypatch):
    cpu_features(avx512_bf16=False)
    with pytest.warns(RuntimeWarning, match=r"Newton-Schulz in bf16.*66\.0x the float32 time"):
        dtypes, _ = _muon_step_dtypes(monkeypatch, ns_dtype=torch.bfloat16)
    assert dtypes == {torch.bfloat16}  # asked for: obeyed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _muon_step_dtypes(monkeypatch, ns_dtype=torch.bfloat16)  # once per process


# ----------------------------------------------------------------------------------------------------------------
# Adam with optax's Nesterov momentum


def _optax_adam(params, grads, lr, b1, b2, eps, wd, nesterov):
    """optax.adamw(lr, b1, b2, eps, eps_root=0, weight_decay=wd, nesterov) written out in numpy."""
    p, m, v = params.copy(), np.zeros_like(params), np.zeros_like(params)
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if nesterov:
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
        out.append(p.copy())
    return out


@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (True, 0.1), (False, 0.0)])
def test_nesterov_adam_matches_optax_formula(nesterov, wd):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((5, 3))
    grads = [rng.standard_normal((5, 3)) * 10.0 ** rng.uniform(-3, 1) for _ in range(7)]
    lr, b1, b2, eps = 1e-2, 0.9, 0.95, 1e-8
    expected = _optax_adam(p0, grads, lr, b1, b2, eps, wd, nesterov)
    p = nn.Parameter(torch.tensor(p0))
    opt = NesterovAdam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, nesterov=nesterov)
    for g, e in zip(grads, expected):
        p.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-14)


def test_torch_nadam_is_not_optax_nesterov_adam():
    """Why NesterovAdam exists: torch's NAdam uses a momentum schedule and differs from optax already at step 2."""
    rng = np.random.default_rng(1)
    p0, grads = rng.standard_normal(4), [rng.standard_normal(4) for _ in range(2)]
    expected = _optax_adam(p0, grads, 1e-2, 0.9, 0.95, 1e-8, 0.0, True)[-1]
    for kw in ({}, {"momentum_decay": 0.0}):
        p = nn.Parameter(torch.tensor(p0))
        opt = torch.optim.NAdam([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
        for g in grads:
            p.grad = torch.tensor(g)
            opt.step()
        assert np.abs(p.detach().numpy() - expected).max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# State round trips


@pytest.mark.parametrize("name", ["muon", "adam"])
def test_optimizer_state_round_trip_is_bit_exact(name):
    cfg = OptimConfig(name=name, lr=1e-2)
    torch.manual_seed(0)
    net = build_model("pMF-tiny")
    init = _save_load(net.state_dict())

    def run(model, opt, steps):
        for s in steps:
            _fake_grads(model, s)
            set_lr(opt, cfg.lr * (1 + s) / 10)  # a changing lr must survive the round trip too
            opt.step()
            opt.zero_grad()

    opt = build_optimizer(net, cfg)
    run(net, opt, range(5))
    reference = {k: v.clone() for k, v in net.state_dict().items()}

    net2 = build_model("pMF-tiny")
    net2.load_state_dict(init)
    opt2 = build_optimizer(net2, cfg)
    run(net2, opt2, range(2))
    ckpt = _save_load({"model": net2.state_dict(), "optim": opt2.state_dict()})

    net3 = build_model("pMF-tiny")
    net3.load_state_dict(ckpt["model"])
    opt3 = build_optimizer(net3, cfg)
    opt3.load_state_dict(ckpt["optim"])
    assert opt3.param_groups[0]["lr"] == cfg.lr * 2 / 10
    run(net3, opt3, range(2, 5))
    for k, v in net3.state_dict().items():
        assert torch.equal(v, reference[k]), k
    # The loaded optimizer owns its state: stepping did not write into the checkpoint.
    assert not any(v is w for st in opt3.state.values() for v in st.values()
                   for s in ckpt["optim"]["state"].values() for w in s.values())


def test_optimizer_load_is_strict():
    net = build_model("pMF-tiny")
    opt = build_optimizer(net, OptimConfig())
    _fake_grads(net, 0)
    opt.step()
    good = _save_load(opt.state_dict())
    build_optimizer(build_model("pMF-tiny"), OptimConfig()).load_state_dict(_save_load(good))  # fine

    with pytest.raises(ValueError):  # all-Adam state into Muon + Adam
        build_optimizer(build_model("pMF-tiny"), OptimConfig()).load_state_dict(
            build_optimizer(build_model("pMF-tiny"), OptimConfig(name="adam")).state_dict())
    with pytest.raises(ValueError):  # a different width: same counts, other shapes
        build_optimizer(build_model("pMF-tiny", hidden_size=16), OptimConfig()).load_state_dict(_save_load(good))
    with pytest.raises(ValueError):  # a different architecture
        build_optimizer(build_model("pMF-tiny", v_head=False), OptimConfig()).load_state_dict(_save_load(good))
    bad = _save_load(good)
    bad["param_groups"][1]["param_names"][0] = "renamed"
    with pytest.raises(ValueError):
        build_optimizer(build_model("pMF-tiny"), OptimConfig()).load_state_dict(bad)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def test_lr_schedule_keyed_to_images():
    c = OptimConfig(lr=1e-3)
    assert lr_at(c, 0.0) == lr_at(c, 1e6) == 1e-3  # the official constant schedule
    w = OptimConfig(lr=1e-3, warmup_kimg=100.0)
    assert lr_at(w, 0.0) == 0.0
    assert lr_at(w, 50.0) == pytest.approx(5e-4)
    assert lr_at(w, 100.0) == lr_at(w, 500.0) == 1e-3
    cos = OptimConfig(lr=1e-3, warmup_kimg=100.0, schedule="cosine", total_kimg=1100.0, min_lr_ratio=0.1)
    assert lr_at(cos, 50.0) == pytest.approx(5e-4)
    assert lr_at(cos, 100.0) == pytest.approx(1e-3)
    assert lr_at(cos, 600.0) == pytest.approx(0.55e-3)  # halfway: mean of lr and lr_min
    assert lr_at(cos, 1100.0) == pytest.approx(1e-4)
    assert lr_at(cos, 5000.0) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        lr_at(OptimConfig(schedule="linear"), 0.0)

    opt = build_optimizer(build_model("pMF-tiny"), OptimConfig())
    set_lr(opt, 0.123)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
    assert opt.muon.param_groups[0]["lr"] == opt.adam.param_groups[0]["lr"] == 0.123


# ----------------------------------------------------------------------------------------------------------------
# EMA


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def _set_params(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_spec_parsing_and_names():
    assert EMASpec.parse("hl500") == EMASpec(halflife_kimg=500.0)
    assert EMASpec.parse("ema_hl500").name == "ema_hl500"
    assert EMASpec.parse("hl0.5").name == "ema_hl0.5"
    assert EMASpec.parse("0.9999") == EMASpec.parse(0.9999) == EMASpec(decay=0.9999)
    assert EMASpec.parse("0.9999").name == "ema_0.9999"
    with pytest.raises(ValueError):
        EMASpec.parse("fast")
    assert EMA(_Tiny()).names == ["ema_hl500", "ema_hl1000", "ema_hl2000"]  # the official three


def test_ema_halflife_algebra_is_batch_size_independent():
    spec = EMASpec(halflife_kimg=0.032)  # 32 images
    # Per-step decay factors: 8 steps of batch 4 equal 4 steps of batch 8, and one half-life of images halves.
    assert ema_beta(spec, 4, 0, ramp=None) ** 8 == pytest.approx(ema_beta(spec, 8, 0, ramp=None) ** 4, rel=1e-14)
    assert ema_beta(spec, 4, 0, ramp=None) ** 8 == pytest.approx(0.5, rel=1e-14)
    assert ema_beta(EMASpec(halflife_kimg=500), 1024, 0, ramp=None) == pytest.approx(0.998581, abs=1e-6)  # recipe
    # The ramp uses the true images seen: half-life = 5 % of them until that exceeds the target.
    assert ema_beta(spec, 4, 100, ramp=0.05) == pytest.approx(0.5 ** (4 / 5.0))
    assert ema_beta(spec, 4, 10_000, ramp=0.05) == ema_beta(spec, 4, 10_000, ramp=None)
    assert ema_beta(EMASpec(decay=0.99), 4, 0) == ema_beta(EMASpec(decay=0.99), 64, 10**6) == 0.99

    # The same through EMA objects on a constant target: initial value 1, target 0, so the EMA is the weight of
    # the initial value.
    results = []
    for batch, steps in [(4, 8), (8, 4), (32, 1)]:
        model = _Tiny()
        _set_params(model, 1.0)
        ema = EMA(model, [spec, "0.9"], ramp=None)
        _set_params(model, 0.0)
        for k in range(1, steps + 1):
            ema.update(model, batch_size=batch, nimg_seen=k * batch)
        w = ema.weights("hl0.032")
        for v in (w["lin.weight"], w["lin.bias"]):
            torch.testing.assert_close(v, torch.full_like(v, 0.5), rtol=1e-6, atol=1e-6)
        assert w["lin.weight"].dtype == torch.float32
        results.append(ema.weights("ema_0.9")["lin.bias"][0].item())
    assert results == pytest.approx([0.9**8, 0.9**4, 0.9], rel=1e-5)  # constant decay: per step, not per image


def test_ema_copies_buffers_and_exports_models():
    model = _Tiny().to(torch.float64)
    ema = EMA(model, ["hl1", "0.5"])
    with torch.no_grad():
        model.count += 7
    ema.update(model, batch_size=8, nimg_seen=8)
    assert int(ema.weights(0)["count"]) == 7 and ema.weights(0)["count"].dtype == torch.int64

    net = ema.model("ema_0.5")
    assert net is not model and not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.lin.weight.dtype == torch.float64
    torch.testing.assert_close(net.lin.weight, ema.weights(1)["lin.weight"].double())
    other = _Tiny()
    ema.copy_to(other, 1)
    torch.testing.assert_close(other.lin.bias, ema.weights("0.5")["lin.bias"])


def test_ema_state_round_trip_and_strict_load():
    torch.manual_seed(0)
    net = build_model("pMF-tiny")
    specs = ["hl0.1", "hl1", "0.99"]

    def run(ema, steps):
        for s in steps:
            _fake_grads(net, s)
            with torch.no_grad():
                for p in net.parameters():
                    p.sub_(0.01 * p.grad)
            ema.update(net, batch_size=16, nimg_seen=16 * (s + 1))

    start = _save_load(net.state_dict())
    a = EMA(net, specs)
    run(a, range(6))
    reference = _save_load(a.state_dict())

    net.load_state_dict(start)
    b = EMA(net, specs)
    run(b, range(3))
    saved = _save_load(b.state_dict())
    c = EMA(net, specs)
    c.load_state_dict(saved)
    run(c, range(3, 6))
    for name in c.names:
        for k, v in c.weights(name).items():
            assert torch.equal(v, reference["shadow"][name][k]), (name, k)

    with pytest.raises(ValueError):
        EMA(net, ["hl0.1", "hl1"]).load_state_dict(saved)
    with pytest.raises(ValueError):
        EMA(net, specs, ramp=None).load_state_dict(saved)
    with pytest.raises(ValueError):
        EMA(build_model("pMF-tiny", v_head=False), specs).load_state_dict(saved)
