"""The diffusers pipeline (pmf.io.pipelines) against pmf.method.sampler.sample: same noise, same labels, same images;
its saved transformer/ is the one network layout. Skipped without diffusers (the optional extra
``pixel-meanflow[diffusers]``). Offline: local folders only."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers pipeline needs the extra: pip install 'pixel-meanflow[diffusers]'")

from pmf.data.images import to_uint8  # noqa: E402
from pmf.io.pipelines import MeanFlowScheduler, PMFPipeline, PMFTransformer2DModel  # noqa: E402
from pmf.method.model import PMFDiT, build_model  # noqa: E402
from pmf.method.sampler import sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = [0, 1, 2, 3]  # 3 = num_classes: unconditional


def tiny_net(seed: int = 0, **overrides) -> PMFDiT:
    torch.manual_seed(seed)
    net = build_model("pMF-tiny", v_head=False, **overrides)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def pipeline(net, scheduler=None) -> PMFPipeline:
    pipe = PMFPipeline(transformer=net, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(seed: int = 5, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(len(LABELS), 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 4, 3])
def test_pipeline_images_equal_the_sampler(steps):
    net = tiny_net()
    z1 = noise()
    ref = sample(net, z1, torch.tensor(LABELS), steps, omega=2.0, t_min=0.1, t_max=0.9)
    pipe = pipeline(net)
    call = dict(class_labels=LABELS, num_inference_steps=steps, guidance_scale=2.0, guidance_interval=(0.1, 0.9),
                latents=z1)
    raw = pipe(**call, output_type="latent").images
    assert torch.equal(raw, ref)  # bit for bit: the same float32 grid and update
    pt = pipe(**call, output_type="pt").images
    assert pt.shape == ref.shape and (pt - ((ref + 1) / 2).clamp(0, 1)).abs().max() <= 1e-6
    assert 0 <= pt.min() and pt.max() <= 1 and ref.min() < -1  # "pt" is clipped to [0, 1]; the test net leaves it
    arr = pipe(**call, output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (4, 8, 8, 1)
    assert np.abs(arr - pt.permute(0, 2, 3, 1).numpy()).max() <= 1e-6
    pil = pipe(**call).images  # default "pil": the pixels `pmf sample` writes
    assert [im.mode for im in pil] == ["L"] * 4 and all(im.size == (8, 8) for im in pil)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), to_uint8(ref)[:, 0].numpy())


def test_diffusers_flow_map_scheduler_takes_the_same_step():
    """diffusers' FlowMapEulerDiscreteScheduler, passed instead: bit-identical where t - r is a power of two, one
    float32 rounding per step apart otherwise (its update runs in float64)."""
    from diffusers import FlowMapEulerDiscreteScheduler

    net = tiny_net()
    pipe = pipeline(net, FlowMapEulerDiscreteScheduler())
    for steps, tol in ((1, 0.0), (4, 0.0), (3, 1e-4)):
        ref = sample(net, noise(), torch.tensor(LABELS), steps, 2.0, 0.1, 0.9)
        out = pipe(LABELS, steps, 2.0, (0.1, 0.9), latents=noise(), output_type="latent").images
        assert (out - ref).abs().max() <= tol, steps


def test_drawn_noise_is_scaled_by_the_noise_scale():
    """latents=None: z_1 = noise_scale * randn(generator), as the sampler takes it."""
    net = tiny_net(noise_scale=2.0)
    pipe = pipeline(net)
    out = pipe(LABELS, 2, 1.5, generator=torch.Generator().manual_seed(7), output_type="latent").images
    z1 = 2.0 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, sample(net, z1, torch.tensor(LABELS), 2, 1.5))


def test_recommended_settings_are_the_defaults(tmp_path):
    net = tiny_net()
    net.save_pretrained(tmp_path, meta={"omega": 1.75, "t_min": 0.2, "t_max": 0.8, "num_steps": 2})
    pipe = pipeline(PMFDiT.from_pretrained(tmp_path))
    ref = sample(net, noise(), torch.tensor(LABELS), 2, 1.75, 0.2, 0.8)
    assert torch.equal(pipe(LABELS, latents=noise(), output_type="latent").images, ref)


def test_pipeline_round_trips_through_save_pretrained(tmp_path):
    net = tiny_net()
    net.pretrained_meta = {"omega": 1.5, "model": "pMF-tiny"}
    pipe = pipeline(net)
    pipe.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model_index.json", "transformer", "scheduler"}
    # transformer/ is the one network layout: the same files as PMFDiT.save_pretrained writes, read by PMFDiT too
    net.save_pretrained(tmp_path / "plain")
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (tmp_path / "transformer" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    assert {p.name for p in (tmp_path / "transformer").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    plain = PMFDiT.from_pretrained(tmp_path / "transformer")
    assert type(plain) is PMFDiT and plain.pretrained_meta == pipe.transformer.pretrained_meta
    loaded = PMFPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is PMFTransformer2DModel and type(loaded.scheduler) is MeanFlowScheduler
    assert loaded.transformer.pretrained_meta == pipe.transformer.pretrained_meta
    assert loaded.transformer.init_kwargs == net.init_kwargs
    for steps in (1, 4):
        a = pipe(LABELS, steps, latents=noise(), output_type="latent").images
        b = loaded(LABELS, steps, latents=noise(), output_type="latent").images
        assert torch.equal(a, b) and torch.equal(a, sample(net, noise(), torch.tensor(LABELS), steps, 1.5))


def test_bad_calls_are_refused():
    pipe = pipeline(tiny_net())
    with pytest.raises(ValueError, match="class_labels"):
        pipe([0, 4])  # 4 > num_classes
    with pytest.raises(ValueError, match="latents have shape"):
        pipe([0, 1], latents=noise())
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], output_type="jpg")
    from diffusers import DDIMScheduler

    with pytest.raises(TypeError, match="average-velocity step"):
        PMFPipeline(transformer=tiny_net(), scheduler=DDIMScheduler())
