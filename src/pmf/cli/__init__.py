"""``pmf`` command line: train, sample, eval, eval-samples, ref-stats, prepare-data, guidance-search, toy,
import-official, export, ablate. Parses text into typed values and calls the library; no module below receives an
argparse Namespace, and nothing imports this package.

- :mod:`pmf.cli.args`: the syntax every subcommand shares (space-separated lists, one meaning per flag name);
- :mod:`pmf.cli.parser`: one function per subcommand's flags;
- :mod:`pmf.cli.commands`: one function per subcommand;
- :mod:`pmf.cli.session`: what they share (the distributed session, a run's defaults, loading a network, checks).

Expected failures (a command line that does not parse, bad settings or arguments, missing or damaged files, a busy
run directory, a full disk, a missing GPU) end with one line naming the file or key and the fix, and exit status 2;
``--debug`` prints the traceback too. Unexpected exceptions keep their traceback. Exit statuses: :mod:`pmf.errors`,
docs/robustness.md."""

from __future__ import annotations

import errno
import os
import sys
import traceback
import zipfile

from pmf.cli.args import UsageError
from pmf.cli.parser import build_parser
from pmf.errors import EXIT_USAGE, PmfError

__all__ = ["build_parser", "main"]


def _expected_errors() -> tuple:
    """Exception types that mean bad input or a bad environment, not a bug: reported in one line."""
    from safetensors import SafetensorError

    import pickle

    import yaml

    # pickles refused by torch.load(weights_only=True), YAML that is not plain data: pmf.io.userfiles names the file
    # where it reads one; these catch any reader that does not
    return (PmfError, ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, SafetensorError,
            pickle.UnpicklingError, yaml.YAMLError)


def error_line(e: BaseException) -> str:
    """One line for an expected failure: what and where (file, key), and the fix."""
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.errno is not None:
        where = e.filename or ""
        hint = {errno.ENOSPC: "free disk space or choose another directory",
                errno.EDQUOT: "free space within your quota or choose another directory",
                errno.EACCES: "check the permissions, or choose another path",
                errno.EPERM: "check the permissions, or choose another path",
                errno.EROFS: "the filesystem is read-only: choose another path",
                errno.ENOENT: "check the path",
                errno.EFBIG: "the file exceeds a size limit (ulimit -f): raise it or free space"}.get(e.errno, "")
        text = f"{e.strerror or e}" + (f": {where}" if where else "") + (f" ({hint})" if hint else "")
    else:
        text = str(e) or type(e).__name__
        if isinstance(e, (EOFError, zipfile.BadZipFile)):
            text = f"a file is truncated or not the expected archive ({type(e).__name__}: {text})"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False) or os.environ.get("PMF_DEBUG") == "1"
    try:
        return args.fn(args)
    except _expected_errors() as e:
        if debug:
            traceback.print_exc()
        print(f"pmf {args.command}: error: {error_line(e)}" + ("" if debug else " (--debug for the traceback)"),
              file=sys.stderr)
        return EXIT_USAGE
