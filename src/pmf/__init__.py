"""pmf: pixel MeanFlow (Lu et al. 2026, arXiv 2601.22158) in PyTorch."""

__version__ = "0.1.0"

from pmf import hub as _hub  # noqa: E402, F401  (attaches save_pretrained / from_pretrained / push_to_hub to PMFDiT)
