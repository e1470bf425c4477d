"""Former location of the FID Inception network, kept so existing scripts keep working: :mod:`pmf.eval.inception`."""

from pmf.eval.inception import InceptionV3FID, load_inception  # noqa: F401
