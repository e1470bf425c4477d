"""What several subcommands share: the distributed session, a run's defaults, loading a network, and the checks
of sampling arguments made before any network is loaded."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pmf.errors import PmfError


@contextmanager
def dist_session(device: str | None):
    """Join the process group under torchrun for the block and leave it after, also on error (one process: no
    group, nothing to leave). Yields the device this rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` when there are
    several ranks. ``device=None``: the block joins the group itself (``pmf train`` reads its device from the
    config); it is still left here, unless the caller had joined one before."""
    from pmf.parallel import dist

    started = not torch.distributed.is_initialized()
    if device is not None:
        dist.init("cuda" if device.startswith("cuda") else "cpu")
        if device == "cuda" and dist.world_size() > 1:
            device = f"cuda:{dist.local_rank()}"
    try:
        yield device
    finally:
        if started:
            dist.shutdown()


@dataclass(frozen=True)
class RunDefaults:
    """What a run directory's resolved config (config.json) sets for the commands that read a checkpoint; every
    field empty for an export or another checkpoint form."""
    config: dict  # the resolved config, {} when the checkpoint is not a run directory
    ema: str  # the EMA copy sampled by default (sample.ema), else "model": the raw weights
    eval: dict  # the `eval:` section (pmf.train.config.EvalConfig): num_samples, batch_size, steps

    def ema_or(self, asked: str | None) -> str:
        """The EMA copy ``--ema`` asks for, else the run's default."""
        return asked or self.ema


def run_defaults(checkpoint: str) -> RunDefaults:
    """The defaults of ``checkpoint`` (:class:`RunDefaults`); a damaged config.json is named in one line."""
    from pmf.util.safe_load import read_json_object

    path = Path(checkpoint) / "config.json"
    config = read_json_object(path, "the run's config") if path.is_file() else {}
    return RunDefaults(config, config.get("sample", {}).get("ema") or "model", config.get("eval", {}))


def load_net(checkpoint: str, ema: str | None = None, device: str = "cpu"):
    """``(net, meta)`` from any checkpoint form (:func:`pmf.train.load.load_checkpoint`); a damaged file is one line."""
    from safetensors import SafetensorError

    from pmf.method.pretrained import HubUnavailableError
    from pmf.train.load import load_checkpoint

    try:
        return load_checkpoint(checkpoint, ema, device)
    except (HubUnavailableError, FileNotFoundError, PmfError):
        raise  # already say what is missing and what to do
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise PmfError(f"cannot load the export {checkpoint} ({type(e).__name__}: {msg}); it is missing or damaged: "
                       "re-export it by rerunning `pmf train` on its run directory, or pick another --checkpoint / "
                       "--ema") from e


def fast(net, args):
    """The network wrapped for ``--precision`` / ``--compile`` (unchanged when neither is asked for)."""
    if args.precision == "fp32" and not args.compile:
        return net
    from pmf.train.speed import InferenceNet

    return InferenceNet(net, args.precision, args.compile)


def refuse(problems: list[str], device: str | None = None) -> None:
    """Every problem of a command line in one :class:`ConfigError` (with ``device``'s, if any), before any work."""
    from pmf.train.validate import ConfigError, device_problem

    if device is not None and (why := device_problem(device, "--device")) is not None:
        problems = [*problems, why]
    if problems:
        raise ConfigError("; ".join(problems))


def at_least_one(**counts) -> list[str]:
    """``--name=value must be >= 1`` for each count given that is below 1 (None: not given)."""
    return [f"--{k.replace('_', '-')}={v} must be >= 1" for k, v in counts.items() if v is not None and v < 1]


def check_sampling_args(args, steps: int | None = None, num: int | None = None) -> None:
    """``--omega``, ``--interval``, ``--steps``, ``--num``, ``--batch-size`` and the device, before any network is
    loaded (pmf.method.sampler.sampling_problems, pmf.train.validate)."""
    from pmf.method.sampler import sampling_problems

    t_min, t_max = args.interval if args.interval else (None, None)
    refuse(sampling_problems(args.omega, t_min, t_max, steps, num) + at_least_one(batch_size=args.batch_size),
           args.device)


def check_ref_stats(path, feature_dim: int | None = 2048) -> None:
    """--ref-stats must be readable and hold statistics of the extractor's features (default the Inception pool
    features, F = 2048; None: readability only), checked from the file's headers before any sample is generated or
    feature computed."""
    from pmf.io.userfiles import check_reference_file

    if path is None or not Path(path).exists():
        return  # setup_metric names a missing file itself, also before any sample is generated
    check_reference_file(path, feature_dim)


def fmnist_classifier_ready() -> None:
    """The Fashion-MNIST CNN, trained and cached by rank 0 on first use, before the other ranks read it."""
    from pmf.eval.fmnist import get_fmnist_classifier
    from pmf.parallel import dist

    if dist.is_main():
        get_fmnist_classifier()
    dist.barrier()


def report(result: dict, out: Path | str | None) -> None:
    """Print a metrics dict as JSON and write it to ``out`` (if any), on rank 0 only."""
    from pmf.parallel import dist

    if not dist.is_main():
        return
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
