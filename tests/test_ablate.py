"""`pmf ablate` (pmf.studies.ablate): a tiny two-arm suite runs end to end through the real training subprocess and the
Fashion-MNIST metric (random-weight classifier injected), resumes without redoing finished runs, and builds its table
from the run directories' files."""

import itertools
import json
import threading
import time

import pytest
import torch

from pmf.eval.fmnist import FashionCNN
from pmf.studies import ablate
from pmf.studies.ablate import Arm, SuiteSettings, run_suite


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


@pytest.mark.slow  # training subprocesses and evaluations (~50 s)
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
        saved = json.loads((run / "eval-0.064-n40-nfe1+2.json").read_text())
        assert saved["train_cpu_seconds"] > 0 and saved["eval_cpu_seconds"] > 0
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


@pytest.mark.slow  # training subprocesses (~20 s)
def test_a_curve_point_behind_a_shared_run_is_not_measured(tmp_path, settings, monkeypatch):
    """A curve arm whose run another arm already trained to the full budget (in an earlier invocation) cannot be scored
    at 1/4 and 1/2 of it (the weights there are gone): those points are reported as not measured, never scored on the
    final weights. (Within one invocation the curve's points come first: the suite works breadth first.)"""
    monkeypatch.setitem(ablate.SUITES, "tiny", lambda: [Arm("plain", "1: tiny", (), (0,)),
                                                        Arm("curve", "1: tiny", (), (0,), curve=True)])
    settings.kimg, settings.eval_num = 0.128, 20  # tiny-test: 32 images per step, so 4 steps
    logs = []
    run_suite("tiny", tmp_path, settings, only=["plain"], log=logs.append)
    records = {r["arm"]: r for r in run_suite("tiny", tmp_path, settings, log=logs.append)}
    assert records["curve"]["run_dir"] == records["plain"]["run_dir"]
    assert list(records["curve"]["stages"]) == ["0.128"]
    assert records["curve"]["stages"]["0.128"] == records["plain"]["stages"]["0.128"]
    assert sum("not measured" in m and "already at 0.128 kimg" in m for m in logs) == 2
    names = sorted(p.name for p in (tmp_path / records["curve"]["run_dir"]).glob("eval-*.json"))
    assert names == ["eval-0.128-n20-nfe1+2.json"]


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


@pytest.mark.slow  # six training subprocesses and two rounds of evaluation
def test_budgets_continue_each_run_and_keep_each_evaluation_keyed_by_its_settings(tmp_path, settings, monkeypatch):
    """Two budgets: each run is continued from the first to the second and scored at both; an evaluation at another
    sample count is not taken from the files of the first (it is measured where the run still is, and reported as
    not measured where the run has gone past); --report-only reads the files and trains nothing."""
    monkeypatch.setitem(ablate.SUITES, "tiny", lambda: [Arm("base", "1: tiny", (), (0,)),
                                                        Arm("lr", "1: tiny", ("optim.lr=3e-3",), (0,), versus="base")])
    settings.kimg = (0.128, 0.064)  # in any order; tiny-test: 32 images per step
    logs = []
    records = {r["arm"]: r for r in run_suite("tiny", tmp_path, settings, log=logs.append)}
    trained = [m for m in logs if "training to" in m]
    assert [m.split("training to ")[1].split()[0] for m in trained] == ["0.064", "0.064", "0.128", "0.128"]
    for rec in records.values():
        run = tmp_path / rec["run_dir"]
        assert json.loads((run / "config.json").read_text())["train"]["total_kimg"] == pytest.approx(0.128)
        assert json.loads((run / "summary.json").read_text())["kimg"] == pytest.approx(0.128)
        early, late = (json.loads((run / f"eval-{k}-n40-nfe1+2.json").read_text()) for k in ("0.064", "0.128"))
        assert early == rec["stages"]["0.064"] and late == rec["stages"]["0.128"]
        assert early["fd_1step"] != late["fd_1step"]
    report = (tmp_path / "report.md").read_text()
    assert "### 0.064 kimg" in report and "### 0.128 kimg" in report and "disjoint" in report
    assert (tmp_path / "claim1.png").stat().st_size > 0

    settings.eval_num = 20
    logs.clear()
    again = {r["arm"]: r for r in run_suite("tiny", tmp_path, settings, log=logs.append)}
    assert sum("0.064 kimg not measured at n20-nfe1+2" in m for m in logs) == 2
    for name, rec in again.items():
        assert list(rec["stages"]) == ["0.128"]  # measured again at 20 samples where the run still is
        assert rec["stages"]["0.128"]["fd_1step"] != records[name]["stages"]["0.128"]["fd_1step"]
        assert (tmp_path / rec["run_dir"] / "eval-0.128-n20-nfe1+2.json").is_file()

    def no_training(*a, **k):
        raise AssertionError("--report-only trained")

    monkeypatch.setattr(ablate, "train_run", no_training)
    settings.eval_num, settings.train = 40, False
    only = {r["arm"]: r for r in run_suite("tiny", tmp_path, settings, log=logs.append)}
    assert {k: r["stages"] for k, r in only.items()} == {k: r["stages"] for k, r in records.items()}


def test_jobs_run_breadth_first_and_one_worker_per_run(tmp_path, settings, monkeypatch):
    """The scheduler (no training: run_stage replaced): with one worker, every (arm, seed) reaches a budget before any
    goes past it; with three workers, a run shared by two arms is never worked twice at once and its stages come in
    order of kimg; a failed stage drops only its run's later stages."""
    arms = [Arm("a", "1: t", (), (0, 1)), Arm("b", "1: t", ("optim.lr=3e-3",), (0,)),
            Arm("b-again", "1: t", ("optim.lr=3e-3",), (0,)), Arm("c", "1: t", ("optim.lr=5e-3",), (0,))]
    settings.kimg = (1.0, 2.0, 4.0)
    started, active, clashes = [], set(), []
    lock = threading.Lock()

    def fake_stage(out, arm, seed, kimg, settings, log):
        run = ablate.run_id(arm, seed, settings)
        with lock:
            clashes.extend([run] if run in active else [])
            active.add(run)
            started.append((kimg, arm.name, seed, run))
        time.sleep(0.01)
        with lock:
            active.discard(run)
        if arm.name == "c" and kimg == 2.0:
            raise RuntimeError("boom")
        return {"fd_1step": kimg}

    monkeypatch.setattr(ablate, "run_stage", fake_stage)
    settings.jobs = 1
    logs = []
    ablate.run_jobs(tmp_path, arms, settings, logs.append)
    assert [k for k, *_ in started] == sorted(k for k, *_ in started)  # breadth first
    assert [(k, a, s) for k, a, s, _ in started if k == 1.0] == [(1.0, "a", 0), (1.0, "a", 1), (1.0, "b", 0),
                                                                 (1.0, "b-again", 0), (1.0, "c", 0)]
    assert ("c", 4.0) not in {(a, k) for k, a, *_ in started} and any("c seed 0 at 2 kimg" in m for m in logs)

    started.clear()
    settings.jobs = 3
    records = ablate.run_jobs(tmp_path, arms, settings, logs.append)
    assert not clashes
    for run in {r for *_, r in started}:
        kimgs = [k for k, *_, r in started if r == run]
        assert kimgs == sorted(kimgs)
    assert {(r["arm"], r["seed"]): list(r["stages"]) for r in records}[("c", 0)] == ["1"]


def test_call_difference_and_the_chance_the_rule_states():
    """Disjoint seed ranges call a difference (lower FD is better), overlapping ones do not; over every ordering of six
    exchangeable values (two equal arms, three seeds each) the rule calls a difference in 2 / C(6, 3) = 10 % of them,
    as the report's RULE says; with fewer seeds, where disjoint ranges are likelier by chance, it calls nothing."""
    call = ablate.call_difference
    assert call([1, 2, 3], [4, 5, 6]) == "better" and call([4, 5, 6], [1, 2, 3]) == "worse"
    assert call([1, 5], [4, 6]) == "no call" and call([], [1.0]) == ""
    calls = [call(list(p[:3]), list(p[3:])) for p in itertools.permutations(range(6))]
    assert sum(c != "no call" for c in calls) / len(calls) == pytest.approx(0.1)
    assert ablate.math.comb(6, 3) == 20 and "10 % for 3 and 3 seeds" in ablate.RULE
    calls = [call(list(p[:2]), list(p[2:])) for p in itertools.permutations(range(4))]
    assert all(c == "no call" for c in calls)  # disjoint by chance in 1/3 of orderings: too likely to call
    assert call([1.0], [4, 5, 6]) == "no call" and call([1, 2, 3, 4], [5, 6, 7]) == "better"  # 50 %, 5.7 %


def test_only_selects_arms_by_name_or_claim_in_the_order_named():
    names = [a.name for a in ablate.select_arms("paper", ["c4-linear-p14", "3", "c4-x-p14"])]
    assert names == ["c4-linear-p14", "c3-full", "c3-r_eq_t", "c3-r_eq_0", "c4-x-p14"]
    assert [a.name for a in ablate.select_arms("paper", ["4"])] == ["c4-x-p14", "c4-linear-p14", "c4-edm-p14",
                                                                    "c4-scm-p14"]
    assert ablate.select_arms("paper") == ablate.paper_suite()


def test_evaluation_files_are_found_by_their_settings(tmp_path, settings):
    """run_stage without training (a report): the file of the requested sample count and NFEs, the many-step score
    at the largest budget only; a file with the many-step score serves a request without it, a report takes one
    without it when that is all there is, and a file of another sample count is never taken."""
    arm = Arm("i", "1: t", (), (0,), instantaneous_steps=4)
    settings.kimg, settings.train = (1.0, 2.0), False
    run = tmp_path / "runs" / ablate.run_id(arm, 0, settings)
    run.mkdir(parents=True)
    (run / "eval-1-n40-nfe1+2.json").write_text(json.dumps({"fd_1step": 1.0}))
    (run / "eval-2-n40-nfe1+2-inst4.json").write_text(json.dumps({"fd_1step": 2.0, "inst_fd_4step": 3.0}))

    def stage(kimg):
        return ablate.run_stage(tmp_path, arm, 0, kimg, settings, print)

    assert stage(1.0) == {"fd_1step": 1.0} and stage(2.0)["inst_fd_4step"] == 3.0
    settings.kimg = (1.0, 2.0, 4.0)  # a later invocation: 2 kimg is now intermediate
    assert stage(2.0)["inst_fd_4step"] == 3.0 and stage(4.0) is None
    settings.kimg = (1.0,)  # wants the many-step score at 1 kimg; a report shows the rest
    assert stage(1.0) == {"fd_1step": 1.0}
    settings.eval_num = 20
    assert stage(1.0) is None and stage(2.0) is None


def test_many_step_column_reads_the_fd_to_the_test_set_only():
    """A many-step score file also holds the FD of the samples to each other (``inst_fd_within_*``); the report's
    many-step column averages the FD to the test set (``inst_fd_{N}step``) of each seed and nothing else."""
    arm = Arm("i", "3: t", (), (0, 1), instantaneous_steps=32)
    records = [{"arm": "i", "seed": s, "stages": {"120": {"fd_1step": 80.0, "inst_fd_32step": fd,
                                                          "inst_fd_within_32step": 7.0}}}
               for s, fd in ((0, 20.0), (1, 26.0))]
    (row,) = ablate.arm_rows([arm], records, 120.0)
    assert row["inst_fd"] == [20.0, 26.0]
    assert ablate.summarise(row["inst_fd"]) == "23.0 (20.0-26.0)"
