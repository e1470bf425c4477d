"""The loader's shared-memory need (pmf.data.datasets.shared_memory_line): DataLoader workers hand their batches over
in /dev/shm, which a container gives 64 MB by default; the need is printed at start and a too-small /dev/shm is
named with its fix before the workers die with a bus error."""

import os
from types import SimpleNamespace

import pytest
import torch

from pmf.data import datasets
from pmf.data.datasets import ShardedLoader, shared_memory_line, shared_memory_need

MB = 10**6


def _statvfs(free_bytes):
    return lambda path: SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096)


def test_shared_memory_need_of_the_imagenet_loader():
    # 1024 images over 8 GPUs: 128 uint8 images of 3 x 256 x 256 (+ int64 labels) per batch and process
    batch = 128 * (3 * 256 * 256 + 8)
    need = shared_memory_need(batch, num_workers=8, prefetch_factor=2, processes=8)
    assert need == 8 * (8 * 2 + 1) * batch  # 3.4 GB on one 8-GPU machine
    assert shared_memory_need(batch, 0, 2, 8) == 0  # no workers: batches stay in the process


def test_a_container_default_shm_is_named_with_its_fix(monkeypatch):
    batch = 128 * (3 * 256 * 256 + 8)
    monkeypatch.setattr(os, "statvfs", _statvfs(64 * MB))
    line, fits = shared_memory_line(batch, 8, 2, processes=8)
    assert not fits and "3.42 GB of shared memory" in line and "0.06 GB free" in line
    assert "--ipc=host" in line and "--shm-size=6g" in line and "data.num_workers" in line
    monkeypatch.setattr(os, "statvfs", _statvfs(100 * 10**9))
    line, fits = shared_memory_line(batch, 8, 2, processes=8)
    assert fits and "--ipc=host" not in line


def test_the_loader_warns_at_start_when_shm_is_too_small(monkeypatch):
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.int64)
    loader = ShardedLoader((images, labels), 16, num_workers=1)
    monkeypatch.setattr(datasets.os, "statvfs", _statvfs(10_000))
    with pytest.warns(RuntimeWarning, match=r"1 workers x 2 prefetched batches of 0\.0 MB need 0\.00 GB.*--ipc=host"):
        x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32)
