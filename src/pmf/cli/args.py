"""The command line's one syntax, shared by every subcommand, and its one-line usage errors.

- A list is space-separated values after one flag: ``--classes 0 3 7``, ``--steps 1 2 4``, ``--omegas 1 2 3``. A
  comma inside a value is refused with the space-separated form to type instead.
- A guidance interval is two values, ``--interval T_MIN T_MAX``; ``pmf guidance-search`` takes the flag once per
  interval it searches.
- One meaning per flag name: ``--set KEY=VALUE`` is a config override (``train``, ``import-official``; repeat it),
  ``--steps`` a number of sampling steps (``sample``, ``eval``, ``guidance-search``).

A command line argparse refuses raises :class:`UsageError`, which ``pmf.cli.main`` prints as one line with exit
status 2, like every other bad input (:mod:`pmf.errors`)."""

from __future__ import annotations

import argparse
import sys

# A flag that moved or was renamed, per subcommand: the form to type now, named in the one-line error.
MOVED = {
    ("eval", "--samples"): "a sample archive is scored by its own subcommand: pmf eval-samples --samples FILE.npz",
    ("eval", "--k"): "precision / recall of a sample archive: pmf eval-samples --samples FILE.npz --k K",
    ("toy", "--steps"): "the toy study's training steps are --train-steps N (--steps counts sampling steps)",
    ("ablate", "--set"): "the ablations' weight files are --weight-file KEY=PATH, e.g. "
                         "--weight-file perceptual.lpips_vgg_path=vgg16-397923af.pth",
    ("guidance-search", "--intervals"): "give each interval as --interval T_MIN T_MAX, once per interval, e.g. "
                                        "--interval 0 1 --interval 0.1 0.8",
}


class UsageError(Exception):
    """A command line that does not parse; its message is the whole line to print."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that name the fix, raised instead of exiting."""

    def error(self, message):
        if message.endswith("--interval: expected 2 arguments"):
            message += ": --interval T_MIN T_MAX, e.g. --interval 0.1 0.8"
        raise UsageError(f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)")

    def parse_args(self, args=None, namespace=None):
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        if argv:
            for token in argv[1:]:
                if (why := MOVED.get((argv[0], token.split("=", 1)[0]))) is not None:
                    raise UsageError(f"{self.prog} {argv[0]}: error: {token.split('=', 1)[0]}: {why}")
        return super().parse_args(argv, namespace)


def listed(kind, flag: str):
    """An argparse ``type`` for one value of the space-separated list after ``flag``: ``kind(text)``; a comma is
    refused, naming the space-separated form."""

    def parse(text: str):
        if "," in text:
            spaced = " ".join(p.strip() for p in text.split(",") if p.strip())
            raise argparse.ArgumentTypeError(f"{text!r}: lists are space-separated: {flag} {spaced}")
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def key_value(flag: str, example: str):
    """An argparse ``type`` for ``KEY=VALUE`` -> ``(key, value)``, refusing text without a key and an ``=`` with
    ``example`` (``KEY=...``) as the form to type."""

    def parse(text: str) -> tuple[str, str]:
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE: {flag} {example}")
        return key.strip(), value

    return parse
