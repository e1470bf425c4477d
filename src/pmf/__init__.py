"""pmf: pixel MeanFlow (Lu et al. 2026, arXiv 2601.22158) in PyTorch.

The public API is this package's names (``from pmf import PMFDiT, pmf_loss, sample``); the modules below
``pmf`` are internal and may move. Names resolve on first use.
"""

__version__ = "0.1.0"

_API = {  # name -> the module that defines it
    "PMFDiT": "pmf.method.model",
    "MODELS": "pmf.method.model",
    "build_model": "pmf.method.model",
    "ObjectiveConfig": "pmf.method.objective",
    "pmf_loss": "pmf.method.objective",
    "sample": "pmf.method.sampler",
    "noise_from_seeds": "pmf.method.sampler",
    "SamplerSettings": "pmf.method.sampler",
    "load_official": "pmf.io.convert",
    "load_checkpoint": "pmf.train.load",
    "frechet_distance": "pmf.eval.stats",
    "load_inception": "pmf.eval.inception",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pmf' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_API})
