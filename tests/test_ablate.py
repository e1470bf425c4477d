"""`pmf ablate` (pmf.ablate): a tiny two-arm suite runs end to end through the real training subprocess and the
Fashion-MNIST metric (random-weight classifier injected), resumes without redoing finished runs, and builds its table
from the run directories' files."""

import json

import pytest
import torch

from pmf import ablate
from pmf.ablate import Arm, SuiteSettings, run_suite
from pmf.eval.fmnist import FashionCNN


def tiny_suite():
    return [Arm("base", "1: tiny", (), (0,), group="a"),
            Arm("lr", "1: tiny", ("optim.lr=3e-3",), (0,), group="b"),
            Arm("lr-again", "1: tiny", ("optim.lr=3e-3",), (0,), group="b"),  # same config: shares "lr"'s run
            Arm("perc", "2: files", (), (0,), needs_files=("perceptual.lpips_vgg_path",))]


@pytest.fixture
def settings(monkeypatch):
    monkeypatch.setitem(ablate.SUITES, "tiny", tiny_suite)
    torch.manual_seed(0)
    classifier = (FashionCNN().eval(), {"test_accuracy": 0.0})
    return SuiteSettings(kimg=0.064, eval_num=40, eval_steps=(1, 2), base="tiny-test", classifier=classifier)


def test_tiny_suite_runs_resumes_and_reports(tmp_path, settings, monkeypatch):
    logs = []
    records = run_suite("tiny", tmp_path, settings, log=logs.append)
    assert any("perc" in m and "skipped" in m and "lpips_vgg_path" in m for m in logs)
    by_arm = {r["arm"]: r for r in records}
    assert set(by_arm) == {"base", "lr", "lr-again"}
    assert by_arm["lr"]["run_dir"] == by_arm["lr-again"]["run_dir"] != by_arm["base"]["run_dir"]
    for rec in records:  # each run trained to the budget and was scored from its own files
        run = tmp_path / rec["run_dir"]
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["train"]["total_kimg"] == pytest.approx(0.064)
        saved = json.loads((run / "eval-0.064.json").read_text())
        assert saved["fd_1step"] == rec["stages"]["0.064"]["fd_1step"] > 0
    assert by_arm["lr"]["stages"]["0.064"]["fd_1step"] != by_arm["base"]["stages"]["0.064"]["fd_1step"]

    report = (tmp_path / "report.md").read_text()
    assert f"| base | `(base)` | 1 | {by_arm['base']['stages']['0.064']['fd_1step']:.1f}" in report
    assert (tmp_path / "claim1.png").stat().st_size > 0

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablate, "train_run", no_training)
    again = run_suite("tiny", tmp_path, settings, log=logs.append)
    assert [r["stages"] for r in again] == [r["stages"] for r in records]


def test_a_curve_point_behind_a_shared_run_is_not_measured(tmp_path, settings, monkeypatch):
    """A curve arm whose run another arm already trained to the full budget cannot be scored at 1/4 and 1/2 of it (the
    weights there are gone): those points are reported as not measured, never scored on the final weights."""
    monkeypatch.setitem(ablate.SUITES, "tiny", lambda: [Arm("plain", "1: tiny", (), (0,)),
                                                        Arm("curve", "1: tiny", (), (0,), curve=True)])
    settings.kimg, settings.eval_num = 0.128, 20  # tiny-test: 32 images per step, so 4 steps
    logs = []
    records = {r["arm"]: r for r in run_suite("tiny", tmp_path, settings, log=logs.append)}
    assert records["curve"]["run_dir"] == records["plain"]["run_dir"]
    assert list(records["curve"]["stages"]) == ["0.128"]
    assert records["curve"]["stages"]["0.128"] == records["plain"]["stages"]["0.128"]
    assert sum("not measured" in m and "already at 0.128 kimg" in m for m in logs) == 2
    assert sorted(p.name for p in (tmp_path / records["curve"]["run_dir"]).glob("eval-*.json")) == ["eval-0.128.json"]


def test_dry_run_lists_every_arm_with_its_cost(settings):
    arms = ablate.dry_run("tiny", settings)
    assert [a["arm"] for a in arms] == ["base", "lr", "lr-again", "perc"]
    assert arms[3]["skipped"] == ["perceptual.lpips_vgg_path"] and arms[0]["skipped"] is None
    assert all(a["est_cpu_minutes"] > 0 for a in arms)


def test_paper_suite_declares_every_claim_with_enough_seeds():
    arms = ablate.paper_suite()
    claims = {a.claim.split(":")[0] for a in arms}
    assert claims == {"1", "2", "3", "4", "5"}
    assert all(len(a.seeds) >= 3 for a in arms if a.claim.startswith("1"))
    assert all(len(a.seeds) >= 2 for a in arms if not a.claim.startswith(("1", "2")))
    sweeps = {g: [a for a in arms if a.sweep == g] for g in ("muon", "adam")}
    assert all(len(v) >= 3 for v in sweeps.values())


def test_run_identity_survives_a_new_default_field_and_changes_with_a_value(settings):
    """A run's identity is its resolved config: an older run's config.json without a field added later at its
    default keeps its identity; a changed value, or the same value set in another arm's way, is compared as
    resolved."""
    arm = Arm("a", "1: tiny", ("optim.lr=3e-3",), (0,))
    cfg = ablate.to_dict(ablate.load_config(settings.base, None, ablate.run_overrides(arm, 0, settings)))
    ident = ablate.run_id(arm, 0, settings)
    assert ablate.config_identity(cfg) == ident
    older = json.loads(json.dumps(cfg))
    del older["train"]["hsdp_shard_size"]  # a field a later version added, at its default
    older["train"]["total_kimg"] = 12.5  # how far a run has got is not part of its identity
    assert ablate.config_identity(older) == ident
    changed = json.loads(json.dumps(cfg))
    changed["optim"]["lr"] = 4e-3
    assert ablate.config_identity(changed) != ident
    assert ablate.run_id(Arm("b", "1: tiny", ("optim.lr=0.003",), (0,)), 0, settings) == ident
