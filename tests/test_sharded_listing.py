"""A training state written by 2 gloo processes (sharded) whose storage shows each rank only its own files in a
directory listing (a lagging NFS-like listing across nodes): the ranks agree on the union of their listings, so the
manifest names every rank's shard and the state verifies; a file no rank can read stops every rank with one error
instead of leaving the others in a collective."""

import json
from pathlib import Path

import torch

from pmf.parallel import dist
from pmf.train import state_dir

from test_dist import _join_group, two_process_results


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _join_group(rank, port)
    out = {}
    real_iterdir = Path.iterdir

    def own_files_only(self):  # this rank sees only the shard files it wrote (and no other rank's)
        for p in real_iterdir(self):
            if not (p.name.endswith(".distcp") and not p.name.startswith(f"__{rank}_")):
                yield p

    try:
        mesh = init_device_mesh("cpu", (2,))
        state = {"net": {"w": distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)])}, "x": 1}
        Path.iterdir = own_files_only
        final = state_dir.save_state_dir(Path(out_dir, "ckpt"), 1, state, {"nimg": 0})
        Path.iterdir = real_iterdir
        dist.barrier()
        out["files"] = sorted(state_dir.read_manifest(final)["files"])
        state_dir.verify_state_dir(final)
        out["verified"] = True

        real_hash = state_dir.sha256_file

        def unreadable_on_rank1(path):
            if rank == 1:
                raise FileNotFoundError(f"no such file: {path}")
            return real_hash(path)

        state_dir.sha256_file = unreadable_on_rank1
        try:
            state_dir.save_state_dir(Path(out_dir, "ckpt"), 2, state, {"nimg": 0})
            out["unreadable"] = "not caught"
        except state_dir.DamagedState as e:
            out["unreadable"] = str(e)
        finally:
            state_dir.sha256_file = real_hash
    finally:
        Path.iterdir = real_iterdir
        dist.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_ranks_agree_on_one_list_of_the_dcp_files(tmp_path):
    for r in two_process_results(_worker, tmp_path, timeout=120):
        assert r["verified"] and {"__0_0.distcp", "__1_0.distcp", ".metadata", "extra.pt"} <= set(r["files"]), r
        assert r["unreadable"].startswith(str(tmp_path / "ckpt" / ".state-000000002.tmp")), r["unreadable"]
        assert "could not be read back" in r["unreadable"] and "unreadable at rank 1" in r["unreadable"], r
