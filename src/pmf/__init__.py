"""pmf: pixel MeanFlow (Lu et al. 2026, arXiv 2601.22158) in PyTorch."""

__version__ = "0.1.0"
