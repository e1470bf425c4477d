"""pmf.method.model: parameter counts of the paper sizes, zero init, the x -> u conversion and its pre-conditioned
variants,
conditioning semantics and token layout, 2-D RoPE, unpatchify, and the network JVP against finite differences."""

import math

import pytest
import torch

import pmf.method.model as model_mod
from pmf.method.model import (
    Block,
    FinalLayer,
    PMFDiT,
    apply_rope,
    build_model,
    precondition,
    rope_2d_angles,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# helpers


def tiny(seed: int = 0, perturb: float = 0.5, **overrides) -> PMFDiT:
    """pMF-tiny in float64; the zero-initialised gates and final layers get N(0, perturb^2) values so the network is a
    non-trivial function (perturb=0 keeps the official init)."""
    torch.manual_seed(seed)
    net = build_model("pMF-tiny", **overrides).double()
    if perturb:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, Block):
                    for p in (m.attn_scale, m.mlp_scale):
                        p.copy_(perturb * torch.randn(p.shape, generator=g, dtype=F64))
                elif isinstance(m, FinalLayer):
                    for p in (m.linear.weight, m.linear.bias):
                        p.copy_(perturb * torch.randn(p.shape, generator=g, dtype=F64))
    return net


def conds(net: PMFDiT, t, seed: int = 1, dtype=F64):
    """Random (z, t, h, omega, t_min, t_max, y) for a batch with the given times t."""
    g = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(t, dtype=dtype)
    B = t.shape[0]
    z = torch.randn(B, net.in_channels, net.input_size, net.input_size, generator=g, dtype=dtype)
    r = t * torch.rand(B, generator=g, dtype=dtype)
    omega = 1 + 3 * torch.rand(B, generator=g, dtype=dtype)
    t_min = 0.3 * torch.rand(B, generator=g, dtype=dtype)
    t_max = 0.6 + 0.4 * torch.rand(B, generator=g, dtype=dtype)
    y = torch.randint(0, net.num_classes + 1, (B,), generator=g)
    return z, t, t - r, omega, t_min, t_max, y


def bc(t, like):
    return t.reshape(-1, *([1] * (like.ndim - 1)))


TIMES = [0.0, 0.01, 0.04, 0.05, 0.3, 0.75, 1.0]  # includes t < 0.05, where the divisor is clipped


# ----------------------------------------------------------------------------------------------------------------
# parameter counts (pMF Tab. 6/7, recounted from the official code)

PAPER_PARAMS_M = {  # eval model (no v-head), bottleneck patch embed
    "pMF-B/16": 118.2, "pMF-L/16": 410.3, "pMF-H/16": 955.5,
    "pMF-B/32": 120.3, "pMF-L/32": 413.0, "pMF-H/32": 959.1,
}
WITH_V_HEAD_M = {"pMF-B/16": 175.5, "pMF-L/16": 511.8, "pMF-H/16": 1113.9}
SWIGLU_HIDDEN = {"B": 2048, "L": 2730, "H": 3416}  # int(8/3 D); H rounded up to a multiple of 8 (torch/hsdp)


def _count_m(name, **kw) -> float:
    with torch.device("meta"):
        net = build_model(name, **kw)
    return net, round(sum(p.numel() for p in net.parameters()) / 1e6, 1)


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_paper_param_counts_and_token_layout(name):
    """Generator parameters (v_head=False) equal the paper-derived counts to 0.1M (pMF Tab. 6/7); every paper size has
    20 prefix tokens + 16x16 = 256 patch tokens, pos-embed over all 276, and SwiGLU hidden int(8/3 D) (x8 for H)."""
    net, count = _count_m(name, v_head=False)
    assert count == PAPER_PARAMS_M[name]
    assert net.num_prefix == 20 and net.num_patches == 256
    D = net.hidden_size
    assert tuple(net.pos_embed.shape) == (1, 276, D)
    assert net.shared_blocks[0].mlp.w1.out_features == SWIGLU_HIDDEN[name[4]]
    assert not hasattr(net, "v_heads") and not hasattr(net, "v_final_layer")


# The official constructor's default kwargs, as written in ``models/pmfDiT.py`` (``pmfDiT.__init__``, torch branch;
# the JAX main branch's dataclass fields have the same names and values).
OFFICIAL_DEFAULTS = dict(input_size=256, patch_size=16, in_channels=3, hidden_size=768, depth=16, num_heads=12,
                         mlp_ratio=8 / 3, num_classes=1000, aux_head_depth=8, num_class_tokens=8, num_time_tokens=4,
                         num_cfg_tokens=4, num_interval_tokens=2)


def _official_token_shapes(kw: dict) -> dict:
    """Token parameter shapes by the official constructor's formulas: t_min/t_max (1, num_interval_tokens, D) each,
    pos_embed over num_patches + class + cfg + 2 * interval + time tokens."""
    D, n = kw["hidden_size"], (kw["input_size"] // kw["patch_size"]) ** 2
    k = kw["num_interval_tokens"]
    prefix = kw["num_class_tokens"] + kw["num_cfg_tokens"] + 2 * k + kw["num_time_tokens"]
    return {"class_tokens": (1, kw["num_class_tokens"], D), "omega_tokens": (1, kw["num_cfg_tokens"], D),
            "t_min_tokens": (1, k, D), "t_max_tokens": (1, k, D), "time_tokens": (1, kw["num_time_tokens"], D),
            "pos_embed": (1, prefix + n, D)}


@pytest.mark.parametrize("how", ["official defaults", "PMFDiT()", "pMF-B/16"])
def test_token_layout_matches_the_official_constructor(how):
    """num_interval_tokens is per endpoint, as in the official pmfDiT: the official defaults, our defaults and the
    pMF-B/16 registry entry all give t_min/t_max tokens (1, 2, 768) and pos_embed (1, 20 + 256, 768), and the same
    parameter count as each other."""
    with torch.device("meta"):
        net = {"official defaults": lambda: PMFDiT(**OFFICIAL_DEFAULTS, v_head=False),
               "PMFDiT()": lambda: PMFDiT(v_head=False),
               "pMF-B/16": lambda: build_model("pMF-B/16", v_head=False)}[how]()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for key, shape in _official_token_shapes(OFFICIAL_DEFAULTS).items():
        assert shapes[key] == shape, key
    assert shapes["t_min_tokens"] == (1, 2, 768) and shapes["pos_embed"] == (1, 276, 768)
    assert net.num_prefix == 20
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == PAPER_PARAMS_M["pMF-B/16"]


@pytest.mark.parametrize("k", [0, 1, 3])
def test_num_interval_tokens_is_per_endpoint(k):
    """k interval tokens per endpoint: 2k interval slots in the prefix, each endpoint's embedding added to its own k
    tokens (an odd k, refused under the old "total" meaning, works)."""
    net = tiny(num_interval_tokens=k)
    kw = {**model_mod.MODELS["pMF-tiny"].kwargs, "num_class_tokens": 8, "num_cfg_tokens": 4, "num_time_tokens": 4,
          "num_interval_tokens": k}
    assert {n: tuple(p.shape) for n, p in net.named_parameters() if n in _official_token_shapes(kw)} == \
        _official_token_shapes(kw)
    assert net.num_prefix == 16 + 2 * k
    z, _, h, om, lo, hi, y = conds(net, [0.3, 0.8])
    base = net.embed(z, h, om, lo, hi, y)
    moved = (net.embed(z, h, om, lo + 0.1, hi, y) - base).abs().amax(dim=(0, 2)) > 0
    assert moved.nonzero().flatten().tolist() == list(range(12, 12 + k))  # t_min's slots only


def test_xs_registry_entry_keeps_its_six_token_prefix():
    """The CPU demo size keeps class 2 | omega 1 | t_min 1 | t_max 1 | time 1 = 6 prefix tokens."""
    with torch.device("meta"):
        net = build_model("pMF-XS/7-28")
    assert net.num_prefix == 6 and tuple(net.t_min_tokens.shape) == (1, 1, 96)


@pytest.mark.parametrize("name", list(WITH_V_HEAD_M))
def test_param_counts_with_v_head(name):
    """Training-time counts with the auxiliary v-head (8 duplicated blocks + final layer): 175.5 / 511.8 / 1113.9M."""
    _, count = _count_m(name, v_head=True)
    assert count == WITH_V_HEAD_M[name]


def test_param_count_without_bottleneck():
    """Plain linear patch embedding (bottleneck_dim=0) for B/16: 118.6M (matches Table 5's 119M)."""
    _, count = _count_m("pMF-B/16", v_head=False, bottleneck_dim=0)
    assert count == 118.6


# ----------------------------------------------------------------------------------------------------------------
# zero init and the x -> u conversion (pMF Eq. 11: u = (z - x_theta) / max(t, 0.05))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_init_gives_u_equal_z_over_clipped_t(dtype):
    """Official init: gates and final layers are zero, so x_theta = 0 and u = v = z / max(t, 0.05) exactly (also for
    t < 0.05, where the divisor is 0.05), and every block is the identity (trunk output == embedded tokens)."""
    torch.manual_seed(0)
    net = build_model("pMF-tiny").to(dtype)
    z, t, h, om, lo, hi, y = conds(net, TIMES, dtype=dtype)
    u, v = net(z, t, h, om, lo, hi, y)
    expected = z / bc(torch.clamp(t, min=0.05), z)
    assert torch.equal(u, expected) and torch.equal(v, expected)
    assert torch.equal(net.trunk(z, t, h, om, lo, hi, y), net.embed(z, h, om, lo, hi, y))


def test_x_to_u_conversion_with_perturbed_weights():
    """prediction "x": u = (z - x_out) / max(t, 0.05) and v = (z - x_out_v) / max(t, 0.05), with x_out the raw image
    output of each head on the shared trunk."""
    net = tiny()
    z, t, h, om, lo, hi, y = conds(net, TIMES)
    u, v = net(z, t, h, om, lo, hi, y)
    s = net.trunk(z, t, h, om, lo, hi, y)
    x_u, x_v = net.head(s, "u"), net.head(s, "v")
    assert x_u.abs().min() > 0 and not torch.allclose(x_u, x_v)  # non-trivial, distinct heads
    div = bc(t.clamp(min=0.05), z)
    torch.testing.assert_close(u, (z - x_u) / div, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, (z - x_v) / div, rtol=1e-12, atol=1e-12)


def test_linear_preconditioning():
    """prediction "linear" (pMF Table 3a): x_theta = (1 - t) z + t out, so u = (z - x_theta) / max(t, 0.05); for
    t >= 0.05 this is u = z - out, for t < 0.05 u = t (z - out) / 0.05."""
    net = tiny(prediction="linear")
    z, t, h, om, lo, hi, y = conds(net, TIMES)
    u, _ = net(z, t, h, om, lo, hi, y)
    out = net.head(net.trunk(z, t, h, om, lo, hi, y), "u")
    tb = bc(t, z)
    x = (1 - tb) * z + tb * out
    torch.testing.assert_close(u, (z - x) / tb.clamp(min=0.05), rtol=1e-12, atol=1e-12)
    big = t >= 0.05
    torch.testing.assert_close(u[big], (z - out)[big], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u[~big], (tb * (z - out) / 0.05)[~big], rtol=1e-10, atol=1e-10)


def _edm_closed_form(t, s, sd):
    var_z = (1 - t) ** 2 * sd**2 + (t * s) ** 2
    return 1 / math.sqrt(var_z), (1 - t) * sd**2 / var_z, t * s * sd / math.sqrt(var_z), var_z


@pytest.mark.parametrize("noise_scale", [1.0, 2.0])
def test_edm_and_scm_coefficients(noise_scale):
    """Path z = (1 - t) x + t s n with Var(x) = sd^2, n ~ N(0, I) independent:
    - edm: c_in^2 Var(z) = 1 (unit-variance input); c_skip = Cov(x, z) / Var(z) = (1 - t) sd^2 / Var(z) (least squares);
      c_skip^2 Var(z) + c_out^2 = sd^2 (the residual x - c_skip z is uncorrelated with z and has variance c_out^2,
      so the net's target (x - c_skip z)/c_out has unit variance); c_out >= 0.
    - scm (TrigFlow): z / alpha = cos(a) x + sin(a) sd n with alpha = sqrt((1-t)^2 + (t s / sd)^2),
      a = atan2(t s / sd, 1 - t); c_skip = cos(a)/alpha, c_out = -sd sin(a), c_in = 1/(alpha sd).
    - edm and scm agree except for the sign of c_out (the claim of `precondition`'s docstring)."""
    sd = 0.5
    ts = [0.0, 0.02, 0.1, 0.37, 0.5, 0.9, 1.0]
    t = torch.tensor(ts, dtype=F64)
    e_in, e_skip, e_out = precondition(t, "edm", noise_scale, sd)
    s_in, s_skip, s_out = precondition(t, "scm", noise_scale, sd)
    for i, ti in enumerate(ts):
        c_in, c_skip, c_out, var_z = _edm_closed_form(ti, noise_scale, sd)
        assert math.isclose(c_in**2 * var_z, 1.0, rel_tol=1e-12)
        assert math.isclose(c_skip**2 * var_z + c_out**2, sd**2, rel_tol=1e-12)
        assert math.isclose(e_in[i].item(), c_in, rel_tol=1e-12)
        assert math.isclose(e_skip[i].item(), c_skip, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(e_out[i].item(), c_out, rel_tol=1e-12, abs_tol=1e-15)
        assert e_out[i] >= 0
        # TrigFlow decomposition
        alpha = math.sqrt((1 - ti) ** 2 + (ti * noise_scale / sd) ** 2)
        a = math.atan2(ti * noise_scale / sd, 1 - ti)
        assert math.isclose(math.cos(a) * alpha, 1 - ti, abs_tol=1e-14)  # coefficient of x in z / alpha, times alpha
        assert math.isclose(math.sin(a) * sd * alpha, ti * noise_scale, abs_tol=1e-14)  # coefficient of n
        assert math.isclose(s_skip[i].item(), math.cos(a) / alpha, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(s_out[i].item(), -sd * math.sin(a), rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(s_in[i].item(), 1 / (alpha * sd), rel_tol=1e-12)
    torch.testing.assert_close(s_in, e_in, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s_skip, e_skip, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s_out, -e_out, rtol=1e-12, atol=1e-15)
    # the plain forms
    assert [c.tolist() for c in precondition(t, "x")] == [[1.0] * 7, [0.0] * 7, [1.0] * 7]
    l_in, l_skip, l_out = precondition(t, "linear")
    assert torch.equal(l_in, torch.ones_like(t)) and torch.equal(l_skip, 1 - t) and torch.equal(l_out, t)
    with pytest.raises(ValueError):
        precondition(t, "eps")


@pytest.mark.parametrize("prediction", ["edm", "scm"])
def test_preconditioned_network(prediction):
    """With the same weights, the pre-conditioned net's head output at z equals the plain "x" net's at c_in z (the
    net sees c_in z), and u = (z - c_skip z - c_out out) / max(t, 0.05), coefficients from the EDM closed form
    (c_out with a minus sign for scm)."""
    net = tiny(prediction=prediction, noise_scale=2.0)
    ref = tiny(prediction="x")
    ref.load_state_dict(net.state_dict())
    z, t, h, om, lo, hi, y = conds(net, [0.02, 0.3, 0.8, 1.0])
    coef = [_edm_closed_form(ti, 2.0, 0.5) for ti in t.tolist()]
    c_in, c_skip, c_out = (torch.tensor([c[j] for c in coef], dtype=F64) for j in range(3))
    if prediction == "scm":
        c_out = -c_out
    out = net.head(net.trunk(z, t, h, om, lo, hi, y), "u")
    out_ref = ref.head(ref.trunk(bc(c_in, z) * z, t, h, om, lo, hi, y), "u")
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    u, _ = net(z, t, h, om, lo, hi, y)
    x_theta = bc(c_skip, z) * z + bc(c_out, z) * out
    torch.testing.assert_close(u, (z - x_theta) / bc(t.clamp(min=0.05), z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("heads", ["u", "uv"])
def test_precondition_runs_once_per_forward(monkeypatch, heads):
    """One forward computes the coefficients once, shared by the trunk's input scale and every head's x -> u (with the
    same result as the pieces trunk / head / to_velocity, which compute their own)."""
    net = tiny(prediction="edm", noise_scale=2.0)
    z, t, h, om, lo, hi, y = conds(net, TIMES)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return precondition(*args, **kwargs)

    monkeypatch.setattr(model_mod, "precondition", counted)
    u, v = net(z, t, h, om, lo, hi, y, heads=heads)
    assert calls == ["edm"]
    s = net.trunk(z, t, h, om, lo, hi, y)
    assert torch.equal(u, net.to_velocity(z, t, net.head(s, "u")))
    assert (v is None) == (heads == "u") and (v is None or torch.equal(v, net.to_velocity(z, t, net.head(s, "v"))))


def test_u_prediction_returns_raw_output():
    """prediction "u" (Table 2 ablation): u is the head's raw output, with the image fed unscaled (same head output
    as the "x" net with the same weights)."""
    net = tiny(prediction="u")
    ref = tiny(prediction="x")
    ref.load_state_dict(net.state_dict())
    z, t, h, om, lo, hi, y = conds(net, TIMES)
    u, v = net(z, t, h, om, lo, hi, y)
    s = net.trunk(z, t, h, om, lo, hi, y)
    assert torch.equal(u, net.head(s, "u")) and torch.equal(v, net.head(s, "v"))
    torch.testing.assert_close(u, ref.head(ref.trunk(z, t, h, om, lo, hi, y), "u"), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# conditioning semantics and token layout (official `models/pmfDiT.py`)


def test_t_enters_only_through_the_division():
    """For prediction "x", x_theta = z - max(t, 0.05) u does not depend on t at fixed h = t - r: two different t with
    the same (z, h, omega, t_min, t_max, y) give the same x_theta (and the same trunk output); changing h does
    change it."""
    net = tiny()
    z, _, _, om, lo, hi, y = conds(net, [0.5, 0.9])
    t1, t2 = torch.tensor([0.6, 0.95], dtype=F64), torch.tensor([0.9, 0.01], dtype=F64)  # t2 = 0.01: clipped
    h = torch.tensor([0.2, 0.005], dtype=F64)  # h <= t for both
    x1 = z - bc(t1.clamp(min=0.05), z) * net(z, t1, h, om, lo, hi, y)[0]
    x2 = z - bc(t2.clamp(min=0.05), z) * net(z, t2, h, om, lo, hi, y)[0]
    torch.testing.assert_close(x1, x2, rtol=1e-10, atol=1e-10)
    assert torch.equal(net.trunk(z, t1, h, om, lo, hi, y), net.trunk(z, t2, h, om, lo, hi, y))
    x3 = z - bc(t1, z) * net(z, t1, h + 0.1, om, lo, hi, y)[0]
    assert (x3 - x1).abs().max() > 1e-3


def test_embedders_receive_h_one_minus_inverse_omega_and_interval():
    """The h embedder gets h = t - r, the omega embedder 1 - 1/omega, cfg_t_start t_min, cfg_t_end t_max; each is
    called once per forward, so t itself reaches no embedder."""
    net = tiny()
    z, t, h, om, lo, hi, y = conds(net, [0.3, 0.8, 0.6])
    seen = {}

    def spy(name):
        def hook(_module, args):
            seen.setdefault(name, []).append(args[0].detach().clone())
        return hook

    names = ("h_embedder", "omega_embedder", "cfg_t_start_embedder", "cfg_t_end_embedder")
    handles = [getattr(net, n).register_forward_pre_hook(spy(n)) for n in names]
    try:
        net(z, t, h, om, lo, hi, y)
    finally:
        for hd in handles:
            hd.remove()
    assert all(len(seen[n]) == 1 for n in names)
    torch.testing.assert_close(seen["h_embedder"][0], h, rtol=0, atol=0)
    torch.testing.assert_close(seen["omega_embedder"][0], 1 - 1 / om, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(seen["cfg_t_start_embedder"][0], lo, rtol=0, atol=0)
    torch.testing.assert_close(seen["cfg_t_end_embedder"][0], hi, rtol=0, atol=0)


def test_timestep_embedding_closed_form():
    """Embedder input s -> Linear-SiLU-Linear of [cos(s f_k), sin(s f_k)], f_k = exp(-ln(1e4) k / 128), k < 128,
    cos first and no x1000 (official `models/embedder.py`)."""
    net = tiny()
    emb = net.h_embedder
    s = torch.tensor([0.0, 0.25, 0.9], dtype=F64)
    f = torch.tensor([math.exp(-math.log(1e4) * k / 128) for k in range(128)], dtype=F64)
    feat = torch.cat([torch.cos(s[:, None] * f), torch.sin(s[:, None] * f)], -1)
    l1, l2 = emb.mlp[0], emb.mlp[2]
    expected = torch.nn.functional.silu(feat @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(emb(s), expected, rtol=1e-12, atol=1e-12)


def test_token_layout_prefix_groups():
    """Sequence = [class(8) | omega(4) | t_min(2) | t_max(2) | time(4) | patches(N)] + pos_embed: changing one
    condition changes exactly its slice; the class slice equals class_tokens + label embedding + pos_embed."""
    net = tiny()
    z, _, h, om, lo, hi, y = conds(net, [0.3, 0.8])
    base = net.embed(z, h, om, lo, hi, y)
    assert net.num_prefix == 20 and base.shape == (2, 20 + 16, 32)
    slices = {"y": (0, 8), "omega": (8, 12), "t_min": (12, 14), "t_max": (14, 16), "h": (16, 20), "z": (20, 36)}
    changed = {
        "y": dict(y=(y + 1) % (net.num_classes + 1)), "omega": dict(om=om + 1.0), "t_min": dict(lo=lo + 0.1),
        "t_max": dict(hi=hi - 0.1), "h": dict(h=h + 0.1), "z": dict(z=z + 1.0),
    }
    for name, kw in changed.items():
        args = dict(z=z, h=h, om=om, lo=lo, hi=hi, y=y) | kw
        new = net.embed(args["z"], args["h"], args["om"], args["lo"], args["hi"], args["y"])
        diff = (new - base).abs().amax(dim=(0, 2)) > 0  # per token position
        a, b = slices[name]
        assert diff[a:b].all() and not diff[:a].any() and not diff[b:].any(), name
    cls = net.class_tokens + net.y_embedder.embedding_table.weight[y][:, None, :] + net.pos_embed[:, :8]
    torch.testing.assert_close(base[:, :8], cls, rtol=0, atol=1e-15)


def test_prefix_dropped_before_final_layer():
    """The final layer sees only the N patch tokens: its input is the head blocks' output at positions [20:]."""
    net = tiny()
    z, t, h, om, lo, hi, y = conds(net, [0.3, 0.8])
    seen = []
    handle = net.u_final_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        s = net.trunk(z, t, h, om, lo, hi, y)
        net.head(s, "u")
    finally:
        handle.remove()
    assert seen[0].shape == (2, net.num_patches, net.hidden_size)
    torch.testing.assert_close(seen[0], net.run_blocks(net.u_heads, s)[:, 20:], rtol=0, atol=0)


def test_null_class_row():
    """The label table has num_classes + 1 rows; label num_classes (null / unconditional) is valid and distinct,
    num_classes + 1 is out of range."""
    net = tiny()
    assert net.y_embedder.embedding_table.weight.shape == (net.num_classes + 1, net.hidden_size)
    z, t, h, om, lo, hi, _ = conds(net, [0.5, 0.5])
    y = torch.tensor([0, net.num_classes])
    u, _ = net(z[:1].expand(2, -1, -1, -1), t, h[:1].expand(2), om[:1].expand(2), lo[:1].expand(2),
               hi[:1].expand(2), y)
    assert (u[0] - u[1]).abs().max() > 1e-6
    with pytest.raises(IndexError):
        net(z, t, h, om, lo, hi, torch.tensor([0, net.num_classes + 1]))


# ----------------------------------------------------------------------------------------------------------------
# 2-D RoPE (official `models/pmfDiT.py`)


def _complex_rope(x, ang):
    """(x[2k] + i x[2k+1]) * exp(i ang_k), back to interleaved real pairs."""
    xc = torch.complex(x[..., 0::2], x[..., 1::2])
    rot = xc * torch.polar(torch.ones_like(ang), ang)
    return torch.stack([rot.real, rot.imag], dim=-1).flatten(-2)


def test_apply_rope_is_complex_product():
    """apply_rope rotates interleaved pairs: equals (x[2k] + i x[2k+1]) e^{i angle_k} computed with complex numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=F64)
    ang = 10 * torch.randn(5, 4, generator=g, dtype=F64)
    out = apply_rope(x, ang.cos(), ang.sin())
    torch.testing.assert_close(out, _complex_rope(x, ang), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=1e-13)  # a rotation
    # pair-wise norms preserved too (rotation within each pair, no mixing of pairs)
    torch.testing.assert_close(out.view(2, 3, 5, 4, 2).norm(dim=-1), x.view(2, 3, 5, 4, 2).norm(dim=-1))


def test_rope_angles_row_then_column():
    """rope_2d_angles(g, hd)[row*g + col] = concat(row * f, col * f), f_k = 10000^(-4k/hd), k < hd/4: the first hd/4
    pairs rotate with the row index, the rest with the column index; the model's buffers are cos/sin of these."""
    grid, hd = 5, 16
    ang = rope_2d_angles(grid, hd)
    assert ang.shape == (grid * grid, hd // 2)
    f = [10000 ** (-4 * k / hd) for k in range(hd // 4)]
    for row in range(grid):
        for col in range(grid):
            expect = torch.tensor([row * fk for fk in f] + [col * fk for fk in f], dtype=torch.float32)
            torch.testing.assert_close(ang[row * grid + col], expect, rtol=1e-6, atol=1e-6)
    net = tiny()
    a = rope_2d_angles(net.grid, net.hidden_size // 2)  # tiny: 2 heads
    torch.testing.assert_close(net.rope_cos, a.cos().double())
    torch.testing.assert_close(net.rope_sin, a.sin().double())


def test_rope_relative_position():
    """<rope(q, a), rope(k, b)> = Re sum_k q_k conj(k_k) e^{i (theta_a - theta_b)_k} depends only on a - b per axis:
    shifting both positions by the same (drow, dcol) leaves the score unchanged; changing the offset changes it."""
    grid, hd = 6, 16
    ang = rope_2d_angles(grid, hd).double()
    cos, sin = ang.cos(), ang.sin()
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, hd, generator=g, dtype=F64)

    def score(a, b):
        ia, ib = a[0] * grid + a[1], b[0] * grid + b[1]
        qa = apply_rope(q.view(1, 1, 1, hd), cos[ia : ia + 1], sin[ia : ia + 1]).flatten()
        kb = apply_rope(k.view(1, 1, 1, hd), cos[ib : ib + 1], sin[ib : ib + 1]).flatten()
        return (qa @ kb).item()

    s0 = score((1, 2), (3, 0))
    for d in [(1, 1), (2, 0), (0, 3), (-1, 2)]:
        shifted = score((1 + d[0], 2 + d[1]), (3 + d[0], 0 + d[1]))
        assert math.isclose(shifted, s0, rel_tol=1e-5, abs_tol=1e-5)
    assert abs(score((1, 2), (3, 1)) - s0) > 1e-3  # other column offset
    assert abs(score((1, 2), (4, 0)) - s0) > 1e-3  # other row offset


def test_attention_module_norm_then_rope_patch_tokens_only(monkeypatch):
    """Inside Attention: q, k are per-head RMSNorm'd over head_dim (one scale vector shared by all heads) and then
    RoPE-rotated on the last N (patch) tokens only; the 20 prefix tokens are not rotated; v is untouched."""
    net = tiny()
    attn = net.shared_blocks[0].attn
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.5, 1.5, attn.head_dim))
        attn.k_norm.weight.copy_(torch.linspace(1.5, 0.5, attn.head_dim))
    captured = {}
    real = model_mod.attention

    def spy(q, k, v, backend):
        captured.update(q=q, k=k, v=v)
        return real(q, k, v, backend)

    monkeypatch.setattr(model_mod, "attention", spy)
    B, L, D, H, hd = 2, 20 + 16, 32, 2, 16
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    attn(x, net.rope_cos, net.rope_sin)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    ang = rope_2d_angles(net.grid, hd).double()
    for name, proj, norm in (("q", attn.q_proj, attn.q_norm), ("k", attn.k_proj, attn.k_norm)):
        t = (x @ proj.weight.T).view(B, L, H, hd).transpose(1, 2)
        t = rms(t, norm.weight)
        expected = torch.cat([t[:, :, :20], _complex_rope(t[:, :, 20:], ang)], dim=2)
        torch.testing.assert_close(captured[name], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(captured["v"], (x @ attn.v_proj.weight.T).view(B, L, H, hd).transpose(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# patches


def _patchify(img, p):
    """Reference (p_row, p_col, c)-ordered patchify by explicit loops: token row*g + col, feature (pr*p + pc)*C + c."""
    B, C, S, _ = img.shape
    g = S // p
    out = torch.empty(B, g * g, p * p * C, dtype=img.dtype)
    for row in range(g):
        for col in range(g):
            for pr in range(p):
                for pc in range(p):
                    for c in range(C):
                        out[:, row * g + col, (pr * p + pc) * C + c] = img[:, c, row * p + pr, col * p + pc]
    return out


def test_unpatchify_inverts_reference_patchify():
    """unpatchify(patchify(x)) == x and patchify(unpatchify(tokens)) == tokens, exactly (3 channels)."""
    net = tiny(in_channels=3)
    g = torch.Generator().manual_seed(5)
    img = torch.randn(2, 3, 8, 8, generator=g, dtype=F64)
    assert torch.equal(net.unpatchify(_patchify(img, 2)), img)
    tok = torch.randn(2, 16, 12, generator=g, dtype=F64)
    assert torch.equal(_patchify(net.unpatchify(tok), 2), tok)


def test_patch_embedding_row_major():
    """Patch embedding tokens are row-major over the grid: an image non-zero only in patch (row 1, col 2) changes
    only token 1*g + 2 (others equal the bias-only token)."""
    net = tiny()
    img = torch.zeros(1, 1, 8, 8, dtype=F64)
    img[:, :, 2:4, 4:6] = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    tok = net.x_embedder(img)
    blank = net.x_embedder(torch.zeros_like(img))
    diff = (tok - blank).abs().amax(-1)[0] > 0
    assert diff.nonzero().flatten().tolist() == [1 * 4 + 2]


# ----------------------------------------------------------------------------------------------------------------
# JVP (what the objective differentiates)


@pytest.mark.parametrize("backend", ["jvp_sdpa", "math"])
def test_network_jvp_matches_finite_differences(backend):
    """d/d eps u(z + eps dz, r, t + eps) at eps = 0 (the MeanFlow total derivative with tangent (dz, 0, 1) on (z, r, t))
    by torch.func.jvp equals the central difference (f(+eps) - f(-eps)) / (2 eps), eps = 1e-6, float64; the batch
    includes t = 0.02, where the clipped divisor has zero derivative."""
    net = tiny(attn_backend=backend)
    z, t, h, om, lo, hi, y = conds(net, [0.3, 0.7, 0.02])
    r = t - h

    def f(z, t, r):
        return net(z, t, t - r, om, lo, hi, y, heads="u")[0]

    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    u, du = torch.func.jvp(f, (z, t, r), (dz, torch.ones_like(t), torch.zeros_like(r)))
    eps = 1e-6
    fd = (f(z + eps * dz, t + eps, r) - f(z - eps * dz, t - eps, r)) / (2 * eps)
    torch.testing.assert_close(u, f(z, t, r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, fd, rtol=1e-5, atol=1e-5 * fd.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# smoke


def test_smoke_2x2_image_shapes():
    """A 2x2 RGB image with patch 1 (grid 2x2) and pMF-tiny: u and v are (B, C, H, W); v is None without a v-head
    or with heads="u"; u is None with heads="v"."""
    kw = dict(input_size=2, patch_size=1, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=2,
              aux_head_depth=1, bottleneck_dim=4)
    for net, shape in ((PMFDiT(**kw), (3, 3, 2, 2)), (build_model("pMF-tiny"), (3, 1, 8, 8))):
        z = torch.randn(shape)
        t = torch.tensor([0.2, 0.5, 1.0])
        args = (z, t, t / 2, torch.full((3,), 2.0), torch.zeros(3), torch.ones(3), torch.tensor([0, 1, 2]))
        u, v = net(*args)
        assert u.shape == shape and v.shape == shape and torch.isfinite(u).all()
        u2, v2 = net(*args, heads="u")
        assert v2 is None and torch.equal(u2, u)
        u3, v3 = net(*args, heads="v")
        assert u3 is None and torch.equal(v3, v)
    net = PMFDiT(**kw, v_head=False)
    u, v = net(torch.randn(3, 3, 2, 2), *args[1:])
    assert u.shape == (3, 3, 2, 2) and v is None
