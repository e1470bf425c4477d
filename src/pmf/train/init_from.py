"""``pmf train --init-from``: a new run's network and EMA copies from an official JAX (Orbax) checkpoint or another
pmf run directory; the optimizer, data position and counters stay fresh. Also the pieces
:mod:`pmf.train.official_run` shares: reading a checkpoint, the checked weight load, the EMA fill."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pmf.errors import PmfError
from pmf.io import orbax_io
from pmf.io.convert import load_official, official_to_ours, ours_to_official
from pmf.train import official_jax

V_HEAD = ("v_heads.", "v_final_layer.")


def read_official(path) -> official_jax.OfficialState:
    """An Orbax checkpoint (directory, workdir or .zip) split into step, network, EMAs and optimizer tree."""
    directory = orbax_io.find_checkpoint(path)
    try:
        return official_jax.split_tree(orbax_io.read_tree(directory))
    finally:
        unpacked = [p for p in (directory, *directory.parents) if p.name.startswith(orbax_io.UNPACK_PREFIX)]
        if unpacked and Path(path).is_file():  # a .zip unpacked into a temporary directory
            shutil.rmtree(unpacked[0], ignore_errors=True)


def _checked_net(sd: dict, kwargs: dict, what: str) -> dict:
    """``sd`` (ours) checked against PMFDiT(**kwargs) by :func:`pmf.io.convert.load_official` (one error listing every
    key and shape problem, with a hint on the size); returns the state dict of the loaded network."""
    try:
        return load_official(ours_to_official(sd, with_rope_freqs=False), **kwargs).state_dict()
    except ValueError as e:
        raise PmfError(f"{what} does not fit the model: {e}".replace("\n", " ")) from None


def _v_head_note(kwargs: dict, sd: dict) -> str | None:
    if kwargs.get("v_head", True) and not any(k.startswith(V_HEAD) for k in sd):
        return "the checkpoint has no v-head (an eval-only tree): the v-head starts from its random initialisation"
    return None


def _load_weights(net: torch.nn.Module, sd: dict) -> None:
    """Load ``sd`` into ``net``: strictly, except a missing v-head (kept at its initialisation)."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(V_HEAD)]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        raise PmfError(f"weights do not fit the run's model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def _fill_emas(ema, state: official_jax.OfficialState, params: dict) -> list[str]:
    """Copy the tree's EMA copies into pmf's ``ema`` by name; copies the run keeps but the tree lacks start from the
    network's weights. Returns notes."""
    notes = []
    for name in ema.names:
        src = state.emas.get(name)
        if src is None:
            notes.append(f"{name}: not in the checkpoint (it has {list(state.emas) or 'none'}); starts from the weights")
            src = params
        with torch.no_grad():
            for k, t in ema.shadow[name].items():
                if k in src:
                    t.copy_(src[k])
                elif k in params:
                    t.copy_(params[k])
    dropped = [n for n in state.emas if n not in ema.names]
    if dropped:
        notes.append(f"EMA copies {dropped} are not in the run's train.ema {ema.names}: not carried (add them to "
                     "train.ema to keep them)")
    return notes



def init_run_from(run, source) -> list[str]:
    """A new run's network and EMA copies from ``source``: an Orbax checkpoint, or a pmf run directory (its newest
    training state). The optimizer, data position and counters stay fresh. Returns notes."""
    from pmf.train.checkpoint import load_latest

    src = Path(source)
    if (src / "checkpoints").is_dir():
        state = load_latest(src)
        if state is None:
            raise PmfError(f"--init-from {src}: the run directory holds no training state")
        params = state["net"]
        emas = dict(state["ema"]["shadow"])
    else:
        official = read_official(src)
        params, emas = official.params, official.emas
    kwargs = {**run.kwargs, "v_head": any(k.startswith(V_HEAD) for k in params)}
    params = _checked_net(official_to_ours(ours_to_official(params, with_rope_freqs=False)), kwargs,
                          f"--init-from {src}")
    notes = [n for n in [_v_head_note(run.kwargs, params)] if n]
    _load_weights(run.net, params)
    fake = official_jax.OfficialState(step=0, params=params, emas=emas)
    notes += _fill_emas(run.ema, fake, run.net.state_dict())
    return notes



def apply_init_from(run, source, resumed: bool) -> None:
    """``pmf train --init-from``: load weights and EMAs into a new run; ignored (said once) when resuming."""
    from pmf.parallel import dist
    from pmf.train import modes

    if resumed:
        dist.print0(f"--init-from {source}: ignored, the run resumes from its own training state")
        return
    if isinstance(run.strategy, modes.Sharded):
        raise PmfError("--init-from needs train.parallel=ddp (or one process): start the run there, then resume it "
                       "sharded")
    notes = init_run_from(run, source)
    dist.print0(f"initialised from {source} (weights and EMA copies; optimizer and counters fresh)")
    for note in notes:
        dist.print0(f"  note: {note}")
