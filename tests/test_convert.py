"""Official checkpoint import (pmf.io.convert). Official-layout state dicts are built from our own model through
``ours_to_official``, so "reproduces outputs exactly" means the import changes no value and misses no key."""

import math

import pytest
import torch
import torch.nn as nn

from pmf.io.convert import (
    ROPE_KEY,
    import_official_main,
    load_official,
    official_kwargs_to_ours,
    official_to_ours,
    ours_to_official,
    rope_freqs,
)
from pmf.method.model import MODELS, PMFDiT, build_model, rope_2d_angles

TINY = "pMF-tiny"  # grid 4 (N = 16), hidden 32, 2 heads (head_dim 16), depth 3, aux 1


def tiny_net(v_head: bool = True, seed: int = 0) -> nn.Module:
    """pMF-tiny with every parameter perturbed, so the zero-init gates and final layers do not hide a wrong key."""
    torch.manual_seed(seed)
    net = build_model(TINY, v_head=v_head)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def tiny_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B = 3
    t = torch.rand(B, generator=g)
    return dict(
        z=torch.randn(B, 1, 8, 8, generator=g),
        t=t,
        h=t * torch.rand(B, generator=g),
        omega=1 + 2 * torch.rand(B, generator=g),
        t_min=torch.full((B,), 0.1),
        t_max=torch.full((B,), 0.9),
        y=torch.tensor([0, 2, 3]),  # 3 = num_classes = the null label
    )


def assert_same_outputs(a, b):
    x = tiny_inputs()
    with torch.no_grad():
        (ua, va), (ub, vb) = a(**x), b(**x)
    assert ua.abs().max() > 0  # non-trivial
    assert torch.equal(ua, ub)
    assert (va is None) == (vb is None)
    if va is not None:
        assert torch.equal(va, vb)


# ----------------------------------------------------------------------------------------------------------------
# Key map


def test_key_map_wraps_exactly_the_linear_and_embedding_layers():
    """Every nn.Linear gets ``._flax_linear``, the label table ``._flax_embedding``, nothing else changes. This
    pins the explicit regex map in convert.py to the model's actual modules."""
    net = tiny_net()
    official = ours_to_official(net.state_dict(), with_rope_freqs=False)
    expected = set()
    for name, m in net.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            wrap = "._flax_linear" if isinstance(m, nn.Linear) else "._flax_embedding" if isinstance(
                m, nn.Embedding) else ""
            expected.add(".".join(filter(None, [name + wrap, pname])))
    assert set(official) == expected


def test_rope_freqs_equals_our_real_rope():
    """rope_freqs = exp(i * angle) = cos + i sin of the angles our attention uses."""
    net = tiny_net()
    rf = rope_freqs(net.grid, 16)
    assert rf.dtype == torch.complex64 and rf.shape == (16, 8)
    assert torch.allclose(rf.real, net.rope_cos) and torch.allclose(rf.imag, net.rope_sin)


@pytest.mark.parametrize("with_rope", [True, False])
def test_official_ours_official_round_trip_is_identity(with_rope):
    official = ours_to_official(tiny_net().state_dict(), with_rope_freqs=with_rope, prefix="net.")
    back = ours_to_official(official_to_ours(official), with_rope_freqs=with_rope, prefix="net.")
    assert list(back) == list(official)  # same keys, same order
    for k in official:
        assert back[k].dtype == official[k].dtype and torch.equal(back[k], official[k]), k


def test_ours_official_ours_round_trip_shares_tensors():
    ours = tiny_net().state_dict()
    back = official_to_ours(ours_to_official(ours))
    assert list(back) == list(ours)
    assert all(back[k] is ours[k] for k in ours)  # a pure rename: no copies


def test_official_to_ours_rejects_misspelled_wrappers():
    official = ours_to_official(tiny_net().state_dict())
    w = official.pop("u_final_layer.linear._flax_linear.weight")
    official["u_final_layer.linear.weight"] = w  # wrapper missing
    official["shared_blocks.0.norm1._flax_linear.weight"] = official.pop("shared_blocks.0.norm1.weight")  # spurious
    with pytest.raises(ValueError) as e:
        official_to_ours(official)
    assert "'u_final_layer.linear.weight'" in str(e.value)
    assert "'shared_blocks.0.norm1._flax_linear.weight'" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# load_official: the happy paths


@pytest.mark.parametrize("v_head", [True, False])
@pytest.mark.parametrize("with_rope", [True, False])
def test_load_official_reproduces_outputs(v_head, with_rope):
    net = tiny_net(v_head)
    official = ours_to_official(net.state_dict(), with_rope_freqs=with_rope, prefix="net.")
    assert all(k.startswith("net.") for k in official)
    assert (f"net.{ROPE_KEY}" in official) == with_rope
    loaded = load_official(official, model=TINY)  # v_head inferred from the keys
    assert loaded.has_v_head == v_head
    assert not loaded.training
    assert_same_outputs(net, loaded)


def test_load_official_from_explicit_kwargs_and_from_file(tmp_path):
    net = tiny_net(v_head=False)
    official = ours_to_official(net.state_dict(), prefix="net.")
    assert_same_outputs(net, load_official(official, **MODELS[TINY].kwargs))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": official, "epoch": 7}, path)  # nested, as training scripts save it
    assert_same_outputs(net, load_official(str(path), model=TINY))


def test_load_official_ambiguous_nesting_is_an_error(tmp_path):
    official = ours_to_official(tiny_net().state_dict())
    with pytest.raises(ValueError, match="several candidates"):
        load_official({"model": official, "ema": official}, model=TINY)


# ----------------------------------------------------------------------------------------------------------------
# load_official: every problem in one error


def test_bad_keys_are_all_listed_in_one_error():
    official = ours_to_official(tiny_net().state_dict(), prefix="net.")
    official["net.extra_head.weight"] = torch.zeros(2, 2)  # extra
    del official["net.u_final_layer.norm.weight"]  # missing
    official["net.pos_embed"] = official["net.pos_embed"][:, :-1]  # wrong shape
    # our name instead of the official one: must not be accepted silently
    q = "net.shared_blocks.1.attn.q_proj"
    official[f"{q}.weight"] = official.pop(f"{q}._flax_linear.weight")
    with pytest.raises(ValueError) as e:
        load_official(official, model=TINY)
    msg = str(e.value)
    for key in ("extra_head.weight", "u_final_layer.norm.weight", "pos_embed",
                "shared_blocks.1.attn.q_proj.weight", "shared_blocks.1.attn.q_proj._flax_linear.weight"):
        assert f"'{key}'" in msg, key
    assert "(1, 35, 32)" in msg and "(1, 36, 32)" in msg  # both shapes of the mismatch
    assert "5 problem(s)" in msg


def test_wrong_model_size_suggests_the_matching_one():
    official = ours_to_official(tiny_net(v_head=False).state_dict(), prefix="net.")
    with pytest.raises(ValueError) as e:
        load_official(official, model="pMF-T/7-28")
    assert "wrong --model size?" in str(e.value) and "'pMF-tiny'" in str(e.value)


def test_explicit_v_head_false_does_not_drop_v_head_keys():
    official = ours_to_official(tiny_net(v_head=True).state_dict())
    with pytest.raises(ValueError) as e:
        load_official(official, model=TINY, v_head=False)
    assert "'v_final_layer.linear._flax_linear.weight'" in str(e.value)
    assert "has a v-head" in str(e.value)


def _corrupt(rf: torch.Tensor, how: str) -> torch.Tensor:
    if how == "one_entry":  # a single angle off by 0.01 rad
        rf = rf.clone()
        rf[5, 3] *= complex(math.cos(0.01), math.sin(0.01))
        return rf
    if how == "col_row_swapped":  # another 2-D layout: column angles first
        h = rf.shape[1] // 2
        return torch.cat([rf[:, h:], rf[:, :h]], dim=1)
    if how == "real":  # the official Module.to(dtype) trap: imaginary part discarded
        return rf.real.clone()
    raise ValueError(how)


@pytest.mark.parametrize("how", ["one_entry", "col_row_swapped", "real"])
def test_corrupted_rope_freqs_is_rejected(how):
    official = ours_to_official(tiny_net().state_dict(), prefix="net.")
    official[f"net.{ROPE_KEY}"] = _corrupt(official[f"net.{ROPE_KEY}"], how)
    with pytest.raises(ValueError, match=ROPE_KEY):
        load_official(official, model=TINY)
    with pytest.raises(ValueError, match=ROPE_KEY):
        official_to_ours(official)


def test_rope_freqs_within_tolerance_is_accepted():
    """An official buffer computed in float32 by other code differs from ours by ~1e-6: accepted."""
    official = ours_to_official(tiny_net().state_dict())
    ang = rope_2d_angles(4, 16).double()
    official[ROPE_KEY] = torch.polar(torch.ones_like(ang), ang + 2e-6).to(torch.complex64)
    load_official(official, model=TINY)


# ----------------------------------------------------------------------------------------------------------------
# CLI body


def test_import_official_main_writes_the_pretrained_layout(tmp_path, capsys):
    net = tiny_net(v_head=False)
    src = tmp_path / "pMF-tiny.pt"
    torch.save(ours_to_official(net.state_dict(), prefix="net."), src)
    import_official_main(str(src), TINY, str(tmp_path / "out"))
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "v-head no" in out and "M params" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    spec = MODELS[TINY]
    expected_meta = {"model": TINY, "noise_scale": spec.noise_scale, "omega": spec.omega, "t_min": spec.t_min,
                     "t_max": spec.t_max, "num_steps": 1, "ema_halflife_kimg": spec.ema_halflife_kimg,
                     "source": "pMF-tiny.pt", "imported_from_official": True}
    loaded = PMFDiT.from_pretrained(tmp_path / "out")
    assert_same_outputs(net, loaded)
    assert loaded.pretrained_meta == expected_meta

# ----------------------------------------------------------------------------------------------------------------
# The official constructor's kwargs (models/pmfDiT.py, pmfDiT.__init__ on the torch branch)

# A small network spelled with EVERY kwarg of the official constructor, at its official default where the size
# does not matter (tokens 8 / 4 / 4 / 2-per-endpoint, init constants 1.0 / 1.0 / 0.32).
OFFICIAL_SMALL = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2,
                      mlp_ratio=8 / 3, num_classes=3, aux_head_depth=1, num_class_tokens=8, num_time_tokens=4,
                      num_cfg_tokens=4, num_interval_tokens=2, token_init_constant=1.0, embedding_init_constant=1.0,
                      weight_init_constant=0.32, eval_mode=True)


def _official_layout_net(**official):
    """Our network built as the official constructor would build it (v-head dropped by eval_mode), perturbed."""
    with pytest.warns(UserWarning, match="init_constant"):
        kw = official_kwargs_to_ours(official)
    torch.manual_seed(0)
    net = PMFDiT(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("k", [2, 3])
def test_load_official_accepts_the_official_constructor_kwargs_unchanged(k):
    """Official-layout weights + the official kwargs as given to pmfDiT(...): t_min/t_max tokens (1, k, D) and
    pos_embed (1, 8 + 4 + 2k + 4 + N, D) as the official constructor makes them; the load reproduces the outputs;
    the init-only constants are ignored with a warning naming them."""
    official_kwargs = {**OFFICIAL_SMALL, "num_interval_tokens": k}
    net = _official_layout_net(**official_kwargs)
    sd = ours_to_official(net.state_dict(), prefix="net.")
    assert tuple(sd["net.t_min_tokens"].shape) == tuple(sd["net.t_max_tokens"].shape) == (1, k, 32)
    assert tuple(sd["net.pos_embed"].shape) == (1, 8 + 4 + 2 * k + 4 + 16, 32)
    with pytest.warns(UserWarning, match="token_init_constant=1.0, embedding_init_constant=1.0, weight_init_cons"):
        loaded = load_official(sd, **official_kwargs)
    assert not loaded.has_v_head
    assert_same_outputs(net, loaded)


def test_official_b16_kwargs_give_the_registry_b16():
    """pmfDiT_B_16 = partial(pmfDiT, input_size=256, depth=16, hidden_size=768, patch_size=16, num_heads=12,
    aux_head_depth=8) (official models/pmfDiT.py), eval_mode=True: the same shapes as our pMF-B/16 without v-head,
    with the official token shapes."""
    kw = official_kwargs_to_ours(dict(input_size=256, depth=16, hidden_size=768, patch_size=16, num_heads=12,
                                      aux_head_depth=8, eval_mode=True))
    with torch.device("meta"):
        ours, registry = PMFDiT(**kw), build_model("pMF-B/16", v_head=False)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in registry.state_dict().items()}
    assert shapes["t_min_tokens"] == shapes["t_max_tokens"] == (1, 2, 768)
    assert shapes["pos_embed"] == (1, 20 + 256, 768)


def test_official_kwargs_errors_list_the_problem():
    with pytest.raises(TypeError, match=r"\['depht', 'hiden_size'\]"):
        official_kwargs_to_ours({"depht": 3, "hiden_size": 32, "depth": 3})
    with pytest.raises(ValueError, match="eval_mode=True, v_head=True disagree"):
        official_kwargs_to_ours({"eval_mode": True, "v_head": True})
    assert official_kwargs_to_ours({"eval": False}) == {"v_head": True}  # the JAX branch's name
    assert official_kwargs_to_ours({"eval_mode": False, "v_head": True, "depth": 3}) == {"v_head": True, "depth": 3}
