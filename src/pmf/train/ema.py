"""EMA copies of the weights (official ``utils/ema_util.py``: three EDM-style EMAs with half-lives of 500, 1000 and
2000 kimg). Decay is keyed to images seen, never to steps, with no hidden batch-size constant: per step
beta = 0.5 ** (batch / (halflife_kimg * 1000)) (EDM2), with EDM's ramp-up (:func:`ema_beta`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class EMASpec:
    """One EMA copy: EDM-style ``halflife_kimg`` (half-life in thousand images) or a constant per-step ``decay``."""

    halflife_kimg: float | None = None
    decay: float | None = None

    def __post_init__(self):
        if (self.halflife_kimg is None) == (self.decay is None):
            raise ValueError("EMASpec needs exactly one of halflife_kimg and decay")
        if self.halflife_kimg is not None and self.halflife_kimg < 0:
            raise ValueError(f"halflife_kimg must be >= 0, got {self.halflife_kimg}")
        if self.decay is not None and not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {self.decay}")

    @property
    def name(self) -> str:
        """"ema_hl500" (half-life 500 kimg) or "ema_0.9999" (constant decay)."""
        return f"ema_hl{_fmt(self.halflife_kimg)}" if self.halflife_kimg is not None else f"ema_{_fmt(self.decay)}"

    @classmethod
    def parse(cls, spec: "str | float | EMASpec") -> "EMASpec":
        """"hl500" / "ema_hl500" -> half-life 500 kimg; "0.9999" / "ema_0.9999" / 0.9999 -> constant decay."""
        if isinstance(spec, EMASpec):
            return spec
        if isinstance(spec, (int, float)):
            return cls(decay=float(spec))
        s = spec.strip()
        s = s[4:] if s.startswith("ema_") else s
        try:
            return cls(halflife_kimg=float(s[2:])) if s.startswith("hl") else cls(decay=float(s))
        except ValueError as e:
            raise ValueError(f"bad EMA spec {spec!r}: use 'hl<kimg>' or a decay like '0.9999'") from e


def ema_beta(spec: EMASpec, batch_size: int, nimg_seen: int, ramp: float | None = 0.05) -> float:
    """Per-step EMA decay.

    EDM style: halflife_nimg = hl_kimg * 1000, ramped as min(halflife_nimg, nimg_seen * ramp) when ``ramp`` is set,
    beta = 0.5 ** (batch_size / halflife_nimg). The decay per *image* is fixed, so k steps of batch B decay exactly
    like k B / B' steps of batch B'. The official code ramps with ``step * 1024 * ramp`` (batch 1024 hard-coded);
    here the true ``nimg_seen`` is used. Constant: beta = decay every step, whatever the batch.
    """
    if spec.decay is not None:
        return spec.decay
    halflife_nimg = spec.halflife_kimg * 1000.0
    if ramp is not None:
        halflife_nimg = min(halflife_nimg, nimg_seen * ramp)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


class EMA:
    """Several EMA copies of a model's weights, kept in float32 on the model's device.

    ``update(model, batch_size, nimg_seen)`` after each optimizer step, with the *global* batch size and the images
    seen including this batch. Parameters are averaged, ema <- beta ema + (1 - beta) theta; persistent buffers are
    copied. Keys are those of ``model.state_dict()``, so pass the bare module (not a DDP / compiled wrapper).
    """

    def __init__(self, model: nn.Module, specs: Sequence["str | float | EMASpec"] = ("hl500", "hl1000", "hl2000"),
                 ramp: float | None = 0.05):
        self.specs = [EMASpec.parse(s) for s in specs]
        self.names = [s.name for s in self.specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate EMA specs: {self.names}")
        self.ramp = ramp
        self._template = model  # for model(); a reference, not a copy
        sd = model.state_dict(keep_vars=True)
        self._averaged = {k for k, v in sd.items() if isinstance(v, nn.Parameter)}  # the rest are buffers: copied
        self.shadow: dict[str, dict[str, torch.Tensor]] = {
            name: {k: self._init_copy(k, v) for k, v in sd.items()} for name in self.names
        }

    def _init_copy(self, key: str, v: torch.Tensor) -> torch.Tensor:
        v = v.detach()
        return v.float().clone() if key in self._averaged and v.is_floating_point() else v.clone()

    def _index(self, which: "int | str") -> str:
        if isinstance(which, int):
            return self.names[which]
        name = which if which.startswith("ema_") else f"ema_{which}"
        if name not in self.shadow:
            raise KeyError(f"unknown EMA {which!r}; have {self.names}")
        return name

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int, nimg_seen: int) -> None:
        sd = model.state_dict(keep_vars=True)
        if set(sd) != set(next(iter(self.shadow.values()))):
            raise ValueError("model's state-dict keys differ from the EMA's (wrapped module? different model?)")
        avg_keys = [k for k in sd if k in self._averaged]
        src = [sd[k].detach() for k in avg_keys]
        for spec, name in zip(self.specs, self.names):
            beta = ema_beta(spec, batch_size, nimg_seen, self.ramp)
            dst = [self.shadow[name][k] for k in avg_keys]
            s = [x if x.dtype == d.dtype else x.to(d.dtype) for x, d in zip(src, dst)]
            if dst:
                torch._foreach_lerp_(dst, s, 1.0 - beta)  # ema + (1 - beta)(theta - ema)
            for k, v in sd.items():
                if k not in self._averaged:
                    self.shadow[name][k].copy_(v)

    def weights(self, which: "int | str") -> dict[str, torch.Tensor]:
        """The EMA state dict (model keys, float32 parameters) of one copy; shared tensors, do not modify."""
        return self.shadow[self._index(which)]

    @torch.no_grad()
    def copy_to(self, model: nn.Module, which: "int | str") -> nn.Module:
        """Load EMA copy ``which`` (index, "ema_hl500" or "hl500") into ``model`` (strict; cast to its dtypes)."""
        model.load_state_dict(self.weights(which), strict=True)
        return model

    def model(self, which: "int | str", like: nn.Module | None = None) -> nn.Module:
        """A deep copy of ``like`` (default: the model given at construction) holding EMA copy ``which``, in eval
        mode with gradients off."""
        net = copy.deepcopy(like if like is not None else self._template)
        for p in net.parameters():
            p.grad = None
            p.requires_grad_(False)
        return self.copy_to(net, which).eval()

    def state_dict(self) -> dict:
        """{"names", "ramp", "shadow": {name: {key: tensor}}}; tensors are shared (serialise before stepping)."""
        return {"names": list(self.names), "ramp": self.ramp, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Strict: same EMA names (in order), ramp, keys and shapes; values are copied into the existing tensors."""
        if set(sd) != {"names", "ramp", "shadow"}:
            raise ValueError(f"EMA state dict must have keys names/ramp/shadow, got {sorted(sd)}")
        if list(sd["names"]) != self.names or list(sd["shadow"]) != self.names:
            raise ValueError(f"EMA names {list(sd['names'])} differ from {self.names}")
        if sd["ramp"] != self.ramp:
            raise ValueError(f"EMA ramp {sd['ramp']} differs from {self.ramp}")
        for name in self.names:
            mine, theirs = self.shadow[name], sd["shadow"][name]
            if set(mine) != set(theirs):
                raise ValueError(f"{name}: keys differ: {sorted(set(mine) ^ set(theirs))[:5]}")
            for k, v in theirs.items():
                if v.shape != mine[k].shape:
                    raise ValueError(f"{name}.{k}: shape {tuple(v.shape)}, expected {tuple(mine[k].shape)}")
        for name in self.names:
            for k, v in sd["shadow"][name].items():
                self.shadow[name][k].copy_(v)
