"""A diffusers pipeline for pMF: :class:`PMFPipeline` (optional extra ``pixel-meanflow[diffusers]``).

    from pmf import PMFDiT
    from pmf.io.pipelines import PMFPipeline
    pipe = PMFPipeline(transformer=PMFDiT.from_pretrained("DIR_OR_REPO_ID"))  # scheduler=None: the default one
    images = pipe(class_labels=[207, 360, 387], num_inference_steps=1).images

The default scheduler is :class:`MeanFlowScheduler`, ours: pMF's average-velocity step
``z_r = z_t - (t - r) u(z_t, r, t)`` [pMF section 6] on the grid ``linspace(1, 0, N + 1)``, both in float32
exactly as :func:`pmf.method.sampler.sample` computes them, so the pipeline's images equal that function's bit for bit.
diffusers' ``FlowMapEulerDiscreteScheduler`` (diffusers >= 0.42) takes the same step, ``z_r = z_t - (sigma_t -
sigma_r) * model_output``, on the same grid, and can be passed instead; it is not the default because it builds the
grid and the update in float64 before rounding to float32: bit-identical to pmf.method.sampler when t - r is a power of
two (1, 2, 4, 8, ... steps), one float32 rounding apart per step otherwise (a few 1e-6 after 3 or 5 steps of the tiny
test network). With it the pipeline hands the scheduler pmf.method.sampler's float32 grid as its sigmas, so the network
still sees the same t and h = t - r.

The network component is :class:`PMFTransformer2DModel`, a :class:`pmf.method.model.PMFDiT` that diffusers accepts as
a component; the pipeline's ``save_pretrained`` writes it, and ``from_pretrained`` reads it, as the one network layout
(``transformer/config.json`` + ``transformer/model.safetensors``, :mod:`pmf.method.pretrained`), so
``PMFDiT.from_pretrained(PIPELINE_DIR / "transformer")`` and ``pmf sample --checkpoint PIPELINE_DIR/transformer`` read
it too. A plain PMFDiT passed to the pipeline is converted, weights and sampling defaults included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

try:
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.utils import BaseOutput
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:
    raise ImportError(f"pmf.io.pipelines needs diffusers: pip install 'pixel-meanflow[diffusers]' ({e})") from None
try:
    from diffusers import FlowMapEulerDiscreteScheduler
except ImportError:  # diffusers < 0.42: only our scheduler
    FlowMapEulerDiscreteScheduler = None

from pmf.data.images import to_uint8
from pmf.method.model import PMFDiT, sampling_meta
from pmf.method.sampler import _per_sample, check_omega

__all__ = ["MeanFlowScheduler", "PMFPipeline", "PMFTransformer2DModel"]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class MeanFlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor  # z_r


class MeanFlowScheduler(SchedulerMixin, ConfigMixin):
    """pMF's few-step sampler as a diffusers scheduler: times ``t_i = linspace(1, 0, N + 1)[i]`` (float32) and
    ``step(u, t_i, z) = z - (t_i - t_{i+1}) * u`` with u the average velocity u(z_{t_i}, t_{i+1}, t_i) [pMF section
    6]; :func:`pmf.method.sampler.sample` in the form diffusers pipelines use. ``timesteps`` are t itself, in [0, 1]."""

    order = 1

    @register_to_config
    def __init__(self):
        self.sigmas = self.timesteps = None
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1).to(device)  # t_0 = 1, ..., t_N = 0
        self.timesteps = self.sigmas[:-1]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # the network takes z_t as it is

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One step from ``timestep`` t_i to the next time t_{i+1}; ``model_output`` is u(z_{t_i}, t_{i+1}, t_i)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        hits = (self.timesteps == torch.as_tensor(timestep, dtype=self.timesteps.dtype).to(self.timesteps.device))
        if hits.sum() != 1:
            raise ValueError(f"timestep {timestep} is not on the schedule {self.timesteps.tolist()}")
        i = int(hits.nonzero()[0, 0])
        t, r = self.sigmas[i].to(sample.device), self.sigmas[i + 1].to(sample.device)
        prev = sample - (t - r) * model_output  # as pmf.method.sampler.step: float32 throughout
        return MeanFlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class PMFTransformer2DModel(PMFDiT, ModelMixin):
    """A :class:`PMFDiT` that a diffusers pipeline can hold: ``ModelMixin`` is how diffusers recognises a component
    it can save and load, but the folder it saves and loads is PMFDiT's own (PMFDiT comes first in the MRO, so its
    ``save_pretrained`` / ``from_pretrained`` are the ones called): the pipeline's ``transformer/`` is a network folder
    of :mod:`pmf.method.pretrained`. ``forward`` is PMFDiT's: ``net(z, t, h, omega, t_min, t_max, y) -> (u, v)``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, torch_dtype: torch.dtype | None = None,
                        **diffusers_loading_kwargs):
        """PMFDiT's loader, called by ``DiffusionPipeline.from_pretrained`` on ``transformer/``. ``torch_dtype`` casts
        the weights. diffusers passes its other loading options always: the memory ones (low_cpu_mem_usage, mmap,
        use_safetensors) change nothing for one small safetensors file; placement and variants are refused when set."""
        if placed := sorted(k for k in ("device_map", "max_memory", "offload_folder", "variant", "quantization_config")
                            if diffusers_loading_kwargs.get(k) is not None):
            raise ValueError(f"PMFTransformer2DModel loads one full-precision folder: {placed} are not supported")
        net = super().from_pretrained(pretrained_model_name_or_path)
        return net if torch_dtype is None else net.to(torch_dtype)

    @classmethod
    def from_pmfdit(cls, net: PMFDiT) -> PMFTransformer2DModel:
        """The same network as this class (a copy of the weights, same device, dtype and train/eval mode)."""
        if isinstance(net, cls):
            return net
        out = cls(**net.init_kwargs)
        out.pretrained_meta = sampling_meta(net)
        out.load_state_dict(net.state_dict(), strict=True)
        ref = next(net.parameters())
        out = out.to(ref.device) if ref.dtype == torch.float32 else out.to(device=ref.device, dtype=ref.dtype)
        return out.train(net.training)


# Schedulers whose step is pMF's average-velocity step.
SCHEDULERS = (MeanFlowScheduler,) + ((FlowMapEulerDiscreteScheduler,) if FlowMapEulerDiscreteScheduler else ())


class PMFPipeline(DiffusionPipeline):
    """Class-conditional pixel MeanFlow sampling: ``pipe(class_labels=[...]).images``.

    transformer: a PMFDiT (converted to :class:`PMFTransformer2DModel`); scheduler: None for
    :class:`MeanFlowScheduler`, or diffusers' ``FlowMapEulerDiscreteScheduler`` (see the module docstring).
    """

    model_cpu_offload_seq = "transformer"
    _optional_components = ["scheduler"]

    def __init__(self, transformer: PMFDiT, scheduler: SchedulerMixin | None = None):
        super().__init__()
        if scheduler is None:
            scheduler = MeanFlowScheduler()
        elif not isinstance(scheduler, SCHEDULERS):
            raise TypeError(f"scheduler must be a MeanFlowScheduler or a FlowMapEulerDiscreteScheduler, got "
                            f"{type(scheduler).__name__}: other schedulers do not take pMF's average-velocity step")
        self.register_modules(transformer=PMFTransformer2DModel.from_pmfdit(transformer), scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate one image per entry of ``class_labels`` (``num_classes`` = unconditional).

        num_inference_steps, guidance_scale (omega), guidance_interval ((t_min, t_max)): None for the model's
        recommended settings (its ``pretrained_meta``: config.json's ``meta``), else 1, 1.0 and (0, 1). ``latents``:
        the initial state z_1 (B, C, H, W), already multiplied by the noise scale as :func:`pmf.method.sampler.sample` takes it; None
        draws ``noise_scale * randn`` with ``generator``. ``output_type``: "pil" (PIL images, pixels as ``pmf sample``
        writes them), "np" ((B, H, W, C) float32 in [0, 1]), "pt" ((B, C, H, W) in [0, 1]) or "latent" (the raw
        output x in [-1, 1], unclipped).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        net = self.transformer
        meta = net.pretrained_meta
        steps = num_inference_steps if num_inference_steps is not None else int(meta.get("num_steps", 1))
        omega = guidance_scale if guidance_scale is not None else meta.get("omega", 1.0)
        t_min, t_max = guidance_interval if guidance_interval is not None else (meta.get("t_min", 0.0),
                                                                                meta.get("t_max", 1.0))
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        device = self._execution_device
        y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if y.numel() == 0 or y.min() < 0 or y.max() > net.num_classes:
            raise ValueError(f"class_labels must be non-empty and lie in 0..{net.num_classes} ({net.num_classes} = "
                             f"unconditional), got {y.tolist()}")
        y = y.to(device)
        B = y.numel()
        shape = (B, net.in_channels, net.input_size, net.input_size)
        if latents is None:
            noise_scale = float(meta.get("noise_scale", net.noise_scale))
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * noise_scale
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; {B} labels need {shape}")
        check_omega(net, omega)

        if isinstance(self.scheduler, MeanFlowScheduler):
            self.scheduler.set_timesteps(steps, device=device)
        else:  # FlowMapEuler: pmf.method.sampler's float32 grid as its sigmas (see the module docstring)
            self.scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), device=device)
        sigmas = self.scheduler.sigmas.to(torch.float32)
        z = latents.to(device=device, dtype=torch.float32)
        w, lo, hi = (_per_sample(v, B, z) for v in (omega, t_min, t_max))
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t, r = sigmas[i].expand(B), sigmas[i + 1].expand(B)
            u, _ = net(z.to(net.dtype), t, t - r, w, lo, hi, y, heads="u")  # average velocity u(z_t, r, t)
            z = self.scheduler.step(u.to(z.dtype), timestep, z).prev_sample
        self.maybe_free_model_hooks()

        if output_type == "latent":
            images = z
        elif output_type == "pil":
            pixels = to_uint8(z.cpu()).permute(0, 2, 3, 1).numpy()
            images = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
        else:
            images = ((z + 1) / 2).clamp(0, 1)
            if output_type == "np":
                images = images.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
