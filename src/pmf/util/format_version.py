"""The one format version of what pmf writes: a network folder's config.json, the training state and the run
directory. A file of any other version, or of none, is refused in one line (:func:`check_format_version`): pmf reads
the one format it writes."""

from __future__ import annotations

from pmf.errors import PmfError

FORMAT_VERSION = 2


class UnsupportedFormat(PmfError, ValueError):
    """A file written in a format version other than :data:`FORMAT_VERSION`."""


def check_format_version(version, source) -> None:
    """Refuse, in one line, anything but this pmf's format version (``None``: the file carries none)."""
    if version != FORMAT_VERSION:
        found = "no format_version" if version is None else f"format_version {version!r}"
        raise UnsupportedFormat(f"{source} has {found}; this pmf reads only version {FORMAT_VERSION}: write it again "
                                "with this pmf (export, or train from step 0 with --restart)")
