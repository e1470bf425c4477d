"""The paper's findings, reproduced small: declared arms, equal image budgets, several seeds, a table and a figure
per claim (``pmf ablate``).

An *arm* is a named list of ``--set`` overrides on one base preset (the Fashion-MNIST demo), trained for the same
number of images with each of its seeds, then scored with the Fashion-MNIST metric (1- and 2-NFE Frechet distance and
class accuracy; ``pmf.eval.fmnist``). The claims (pMF, arXiv 2601.22158):

1. x-prediction works at any per-token dimension, u-prediction collapses at a large one (Tab. 2): patch 4 (16 values
   per token), 7 (49, the demo) and 14 (196) on 28 x 28 images.
2. Muon beats Adam (Fig. 3a): each at its best learning rate of a three-point sweep, then FD against images seen.
3. Training on the full (r, t) plane beats r = t only or r = 0 only (Tab. 3b) at one step; the r = t model is also
   scored with the many-step instantaneous sampler (the flow-matching bound, not a one-step model).
4. Plain x-prediction beats linear, EDM and sCM pre-conditioning at a large per-token dimension (Tab. 3a).
5. The perceptual loss helps (Tab. 4): needs the LPIPS / ConvNeXt weight files; skipped with a message without them.

A run's identity is its resolved config (without ``train.total_kimg``, which only says how far it has got), so a
rerun skips finished work, and arms that resolve to the same config (claim 1's x at patch 14 and claim 4's x) share
one run. Training runs as ``pmf train`` subprocesses (one thread each, ``--jobs`` side by side); curves and longer
budgets come from resuming the same run to a larger ``total_kimg`` (the demo's learning rate is constant, so a run
stopped at k kimg is exactly the first k kimg of a longer one). Several budgets (``--kimg 30 60 120``) are worked
breadth first: every run reaches a budget before any run goes past it, so a stopped suite leaves complete tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pmf.train.config import RunConfig, load_config, to_dict
from pmf.util.atomic import atomic_write_text

BASE_PRESET = "fmnist-demo"


@dataclass(frozen=True)
class Arm:
    name: str  # unique within a suite, e.g. "c1-u-p14"
    claim: str  # which claim's table and figure it belongs to
    overrides: tuple = ()  # `--set` overrides on the base preset
    seeds: tuple = (0, 1)
    x: float | None = None  # the figure's x value (per-token dimension; learning rate of a sweep), if it has one
    group: str = ""  # a curve / bar group in the figure (e.g. "x" or "u")
    curve: bool = False  # also evaluate at 1/4 and 1/2 of the budget (FD against images seen)
    instantaneous_steps: int = 0  # also score the many-step instantaneous (flow-matching) sampler
    sweep: str = ""  # lr-sweep group: the best lr of the group (seed 0, 1-NFE FD) gets the extra seeds
    needs_files: tuple = ()  # config keys naming weight files that must exist, else the arm is skipped
    versus: str = ""  # the arm the paper says beats this one: the report calls the difference (see call_difference)


def _patch(p: int, prediction: str = "x") -> tuple:
    return (f"model.overrides={{patch_size: {p}, prediction: {prediction}}}",)


def paper_suite() -> list[Arm]:
    arms = []
    for p in (4, 7, 14):  # claim 1: per-token dimension p^2 (one channel)
        for pred in ("x", "u"):
            arms.append(Arm(f"c1-{pred}-p{p}", "1: x vs u prediction", _patch(p, pred), (0, 1, 2), x=p * p,
                            group=pred, versus=f"c1-x-p{p}" if pred == "u" else ""))
    # claim 2: each sweep brackets its best value (in shorter sweeps the best was the largest value for both)
    sweeps = (("muon", ("2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2", "6.4e-2")),
              ("adam", ("1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2")))
    for opt, lrs in sweeps:
        for lr in lrs:
            arms.append(Arm(f"c2-{opt}-lr{lr}", "2: Muon vs Adam", (f"optim.name={opt}", f"optim.lr={lr}"), (0,),
                            x=float(lr), group=opt, curve=True, sweep=opt))
    for region in ("full", "r_eq_t", "r_eq_0"):  # claim 3
        arms.append(Arm(f"c3-{region}", "3: (r, t) sampling region", (f"objective.time_region={region}",), (0, 1, 2),
                        group=region, instantaneous_steps=32 if region == "r_eq_t" else 0,
                        versus="" if region == "full" else "c3-full"))
    for pred in ("x", "linear", "edm", "scm"):  # claim 4, at claim 1's largest per-token dimension
        arms.append(Arm(f"c4-{pred}-p14", "4: pre-conditioners", _patch(14, pred), (0, 1, 2), group=pred,
                        versus="" if pred == "x" else "c4-x-p14"))
    lpips = ("perceptual.lpips_vgg_path", "perceptual.lpips_lin_path")
    arms.append(Arm("c5-mse", "5: perceptual loss", (), (0, 1), group="without", versus="c5-lpips"))
    arms.append(Arm("c5-lpips", "5: perceptual loss", ("objective.perceptual_weights={lpips: 0.4}",), (0, 1),
                    group="with", needs_files=lpips))
    return arms


SUITES = {"paper": paper_suite}


@dataclass
class SuiteSettings:
    kimg: float | tuple = 30.0  # budget(s): images per arm and seed, in thousands; each budget is evaluated
    eval_num: int = 10_000  # samples per evaluation (class-balanced)
    eval_steps: tuple = (1, 2)
    jobs: int = 1  # arms trained side by side, one thread each
    base: str = BASE_PRESET
    extra: tuple = ()  # overrides applied to every arm (e.g. a smaller model for tests)
    classifier: object = None  # injected (model, info) for tests; default: the cached Fashion-MNIST CNN
    files: dict = field(default_factory=dict)  # perceptual weight paths, key -> path (pmf ablate --weight-file)
    train: bool = True  # False: train and evaluate nothing, report the evaluations already on disk

    @property
    def budgets(self) -> tuple:
        """The budgets in kimg, ascending (``kimg`` as one number or several)."""
        values = self.kimg if isinstance(self.kimg, (tuple, list)) else (self.kimg,)
        return tuple(sorted({float(k) for k in values}))


# ----------------------------------------------------------------------------------------------------------------
# Runs: identity, training, evaluation


def run_overrides(arm: Arm, seed: int, settings: SuiteSettings) -> list[str]:
    files = [f"{k}={v}" for k, v in settings.files.items()]
    return [*settings.extra, *arm.overrides, *files, f"train.seed={seed}", "train.threads=1",
            "train.sample_every_kimg=0"]


def config_identity(cfg: dict) -> str:
    """A resolved config's identity: the hash of its values that differ from the config defaults
    (:class:`pmf.train.config.RunConfig`), without ``train.total_kimg``. Leaving out default values keeps the
    identity of existing runs when a later version adds a config field whose default changes nothing."""
    defaults = json.loads(json.dumps(to_dict(RunConfig())))  # as a config.json holds them (tuples as lists)

    def changed(values: dict, base: dict) -> dict:
        out = {}
        for k, v in values.items():
            d = base.get(k) if isinstance(base, dict) else None
            if isinstance(v, dict) and isinstance(d, dict) and v and d:
                v = changed(v, d)
                if v:
                    out[k] = v
            elif k not in base or v != d:
                out[k] = v
        return out

    cfg = json.loads(json.dumps(cfg))
    cfg.get("train", {}).pop("total_kimg", None)
    return hashlib.sha1(json.dumps(changed(cfg, defaults), sort_keys=True).encode()).hexdigest()[:10]


def run_id(arm: Arm, seed: int, settings: SuiteSettings) -> str:
    """The run directory of (arm, seed): its resolved config's identity (:func:`config_identity`), so arms whose
    configs resolve alike share one run."""
    return config_identity(to_dict(load_config(settings.base, None, run_overrides(arm, seed, settings))))


def missing_files(arm: Arm, settings: SuiteSettings) -> list[str]:
    return [k for k in arm.needs_files if not settings.files.get(k) or not Path(settings.files[k]).is_file()]


def train_run(run_dir: Path, arm: Arm, seed: int, kimg: float, settings: SuiteSettings) -> tuple[float, float]:
    """``pmf train`` to ``kimg`` (resuming what is there); returns the (wall, CPU) seconds it took, the CPU time
    (user + system) read from this subprocess's own resource usage, so runs side by side are told apart."""
    cmd = [sys.executable, "-m", "pmf", "train", "--preset", settings.base, "--run-dir", str(run_dir), "--quiet"]
    for s in [*run_overrides(arm, seed, settings), f"train.total_kimg={kimg:g}"]:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 also returns the child's CPU time
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"training {run_dir.name} failed (exit {proc.returncode}): {err.read().strip()[-2000:]}")
    return time.time() - t0, usage.ru_utime + usage.ru_stime


def evaluate_run(run_dir: Path, settings: SuiteSettings, instantaneous_steps: int = 0) -> dict:
    """Fashion-MNIST metrics of the run's sampling EMA at its sampling settings, resolved as `pmf eval` does."""
    from pmf.eval.fmnist import fmnist_metrics
    from pmf.train.load import load_checkpoint
    from pmf.method.sampler import SamplerSettings

    net, meta = load_checkpoint(str(run_dir))  # the export's meta carries the run's sample.omega and interval
    sampling = SamplerSettings.from_meta(meta, net=net).kwargs()
    sampling.pop("instantaneous")
    common = dict(n=settings.eval_num, classifier=settings.classifier, **sampling)
    res = fmnist_metrics(net, steps=list(settings.eval_steps), with_reference_points=False, **common)
    if instantaneous_steps:
        inst = fmnist_metrics(net, steps=[instantaneous_steps], instantaneous=True, with_reference_points=False,
                              **common)
        res.update({f"inst_{k}": v for k, v in inst.items() if k.endswith(f"_{instantaneous_steps}step")})
    return {k: v for k, v in res.items() if isinstance(v, (int, float))}


def kimg_past(run_dir: Path, kimg: float) -> float | None:
    """The images (in thousands) a run has already trained on, when that is past ``kimg`` by more than the one global
    batch a run may overshoot its budget by (it stops at the first step at or past it); else None. Read from the
    run's ``summary.json`` and ``config.json``."""
    summary, config = run_dir / "summary.json", run_dir / "config.json"
    if not (summary.is_file() and config.is_file()):
        return None
    seen = float(json.loads(summary.read_text()).get("kimg", 0.0))
    batch_kimg = json.loads(config.read_text())["train"]["batch_size"] / 1000
    return seen if seen > kimg + batch_kimg else None


def stages_of(arm: Arm, settings: SuiteSettings) -> list[float]:
    """The kimg at which (arm, seed) is evaluated: every budget, and 1/4 and 1/2 of each when the arm has a curve."""
    fractions = (0.25, 0.5, 1.0) if arm.curve else (1.0,)
    return sorted({b * f for b in settings.budgets for f in fractions})


def eval_key(settings: SuiteSettings, instantaneous_steps: int) -> str:
    """What an evaluation file measured, in its name: sample count, NFEs, and the many-step sampler's steps if any,
    so an evaluation at other settings is never taken for this one."""
    key = f"n{settings.eval_num}-nfe{'+'.join(str(k) for k in settings.eval_steps)}"
    return key + (f"-inst{instantaneous_steps}" if instantaneous_steps else "")


def instantaneous_at(arm: Arm, kimg: float, settings: SuiteSettings) -> int:
    """The many-step sampler's steps scored at ``kimg``: at the largest budget only (32 steps cost ten times the 1-
    and 2-NFE scores together)."""
    return arm.instantaneous_steps if kimg == max(settings.budgets) else 0


def eval_path(run_dir: Path, arm: Arm, kimg: float, settings: SuiteSettings) -> Path:
    """The file of (arm, seed)'s evaluation at ``kimg`` (:func:`eval_key`); one that also holds the many-step score
    serves a request without it (an earlier invocation's largest budget is a later one's intermediate)."""
    path = run_dir / f"eval-{kimg:g}-{eval_key(settings, instantaneous_at(arm, kimg, settings))}.json"
    fuller = run_dir / f"eval-{kimg:g}-{eval_key(settings, arm.instantaneous_steps)}.json"
    return fuller if not path.is_file() and fuller.is_file() else path


def run_stage(out: Path, arm: Arm, seed: int, kimg: float, settings: SuiteSettings, log) -> dict | None:
    """Train (arm, seed) to ``kimg`` and evaluate it there, unless the file of that evaluation exists
    (:func:`eval_path`); None when it cannot be measured (the run is past ``kimg``, or ``settings.train`` is off)."""
    run_dir = out / "runs" / run_id(arm, seed, settings)
    path = eval_path(run_dir, arm, kimg, settings)
    if path.is_file():
        return json.loads(path.read_text())
    if not settings.train:  # a report takes the 1- and 2-NFE scores without the many-step one if that is all there is
        lesser = run_dir / f"eval-{kimg:g}-{eval_key(settings, 0)}.json"
        return json.loads(lesser.read_text()) if lesser.is_file() else None
    seen = kimg_past(run_dir, kimg)
    if seen is not None:  # the run (shared with another arm, or trained further before) has gone past this point
        log(f"[{arm.name} seed {seed}] {kimg:g} kimg not measured at {eval_key(settings, 0)}: run {run_dir.name} is "
            f"already at {seen:g} kimg")
        return None
    log(f"[{arm.name} seed {seed}] training to {kimg:g} kimg in {run_dir.name}")
    wall, cpu = train_run(run_dir, arm, seed, kimg, settings)
    t0, c0 = time.time(), time.thread_time()  # evaluation runs in this thread (one torch thread per job)
    metrics = evaluate_run(run_dir, settings, instantaneous_at(arm, kimg, settings))
    metrics.update(train_seconds=wall, train_cpu_seconds=cpu, eval_seconds=time.time() - t0,
                   eval_cpu_seconds=time.thread_time() - c0)
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    log(f"[{arm.name} seed {seed}] {kimg:g} kimg: 1-NFE FD {metrics.get('fd_1step', float('nan')):.1f} "
        f"(train {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU)")
    return metrics


def run_jobs(out: Path, arms: list[Arm], settings: SuiteSettings, log) -> list[dict]:
    """Every (arm, seed, stage), breadth first: in order of kimg, then arm, then seed, with ``settings.jobs``
    workers; a run directory is worked by one worker at a time (arms may share a run) and in order of kimg. A stage
    that fails is logged and the later stages of its run are dropped; the others go on. Returns one record per
    (arm, seed) with the stages measured."""
    jobs = sorted(((kimg, i, seed) for i, arm in enumerate(arms) for seed in arm.seeds
                   for kimg in stages_of(arm, settings)), key=lambda j: j[0])
    runs = {(i, seed): run_id(arms[i], seed, settings) for _, i, seed in jobs}
    records = {(i, seed): {"arm": arms[i].name, "seed": seed, "run_dir": f"runs/{runs[i, seed]}", "stages": {}}
               for _, i, seed in jobs}
    busy, failed, errors = set(), set(), []
    cond = threading.Condition()

    def next_job():
        with cond:
            while True:
                waiting = False
                for job in jobs:
                    run = runs[job[1], job[2]]
                    if run in failed:
                        continue
                    if run not in busy:
                        jobs.remove(job)
                        busy.add(run)
                        return job
                    waiting = True
                if not waiting:
                    return None
                cond.wait()

    def worker():
        while (job := next_job()) is not None:
            kimg, i, seed = job
            run = runs[i, seed]
            try:
                metrics = run_stage(out, arms[i], seed, kimg, settings, log)
            except Exception as e:  # noqa: BLE001 -- one failed run must not stop the others; reported at the end
                log(f"[{arms[i].name} seed {seed}] failed at {kimg:g} kimg: {e}")
                errors.append(f"{arms[i].name} seed {seed} at {kimg:g} kimg")
                metrics = None
                with cond:
                    failed.add(run)
            with cond:
                if metrics is not None:
                    records[i, seed]["stages"][f"{kimg:g}"] = metrics
                busy.discard(run)
                cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(max(1, settings.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        log(f"failed: {'; '.join(errors)} (rerun the same command to retry them)")
    return [r for r in records.values() if r["stages"]]


# ----------------------------------------------------------------------------------------------------------------
# The suite


def select_sweeps(arms: list[Arm], records: list[dict], seeds: tuple) -> list[Arm]:
    """For each lr-sweep group, the arm with the lowest 1-NFE FD (seed 0) again with the extra ``seeds``."""
    best = {}
    for arm in arms:
        if not arm.sweep:
            continue
        rec = next((r for r in records if r["arm"] == arm.name and r["seed"] == 0), None)
        if rec is None:
            continue
        fd = final(rec)["fd_1step"]
        if arm.sweep not in best or fd < best[arm.sweep][1]:
            best[arm.sweep] = (arm, fd)
    return [dataclasses.replace(a, name=a.name + "-best", seeds=seeds, sweep="") for a, _ in best.values()]


def final(record: dict) -> dict:
    return record["stages"][max(record["stages"], key=float)]


def select_arms(suite: str, only: list[str] | None = None) -> list[Arm]:
    """The suite's arms, or those ``only`` names (arm names or claim numbers) in the order it names them, so a budget
    is worked first for the arms named first (the order matters when a suite is stopped before it finishes)."""
    arms = SUITES[suite]()
    if not only:
        return arms

    def rank(arm: Arm) -> int | None:
        return next((i for i, key in enumerate(only) if key in (arm.name, arm.claim.split(":")[0])), None)

    return sorted((a for a in arms if rank(a) is not None), key=rank)


def run_suite(suite: str, out, settings: SuiteSettings, only: list[str] | None = None, log=print) -> list[dict]:
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; available: {', '.join(SUITES)}")
    out = Path(out)
    arms = select_arms(suite, only)
    skipped = {a.name: missing_files(a, settings) for a in arms if missing_files(a, settings)}
    for name, keys in skipped.items():
        log(f"[{name}] skipped: needs weight files {', '.join(keys)} (give them with --weight-file KEY=PATH)")
    arms = [a for a in arms if a.name not in skipped]
    lock = threading.Lock()

    def safe_log(msg):
        with lock:
            log(msg)

    records = run_jobs(out, arms, settings, safe_log)
    best = select_sweeps(arms, records, (1, 2))  # claim 2: three seeds at each optimizer's best lr
    records += run_jobs(out, best, settings, safe_log)
    for arm in best:  # the best arm's seed 0 is its sweep run
        src = next(r for r in records if r["arm"] == arm.name.removesuffix("-best") and r["seed"] == 0)
        records.append({**src, "arm": arm.name})
    all_arms = arms + [dataclasses.replace(a, seeds=(0, *a.seeds)) for a in best]
    report = write_report(out, suite, all_arms, records, settings, skipped)
    atomic_write_text(out / "results.json", json.dumps({"records": records, "report": report}, indent=2) + "\n")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Report: a Markdown table and one figure per claim, generated from the run directories' eval files

METRICS = (("fd_1step", "FD 1-NFE"), ("fd_2step", "FD 2-NFE"), ("class_acc_1step", "class acc 1-NFE"))


def summarise(values: list[float]) -> str:
    if not values:
        return ""
    v = np.asarray(values, float)
    return f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})" if len(v) > 1 else f"{v[0]:.1f}"


def stage_at(record: dict, kimg: float) -> dict | None:
    return record["stages"].get(f"{kimg:g}")


INST_FD = re.compile(r"inst_fd_\d+step")  # the many-step score's FD against the test set


def arm_rows(arms: list[Arm], records: list[dict], kimg: float | None = None) -> list[dict]:
    """One row per arm with its seeds' metrics at ``kimg`` (default: each record's last stage) and the training /
    evaluation time of all stages up to it."""
    rows = []
    for arm in arms:
        recs = [r for r in records if r["arm"] == arm.name and (kimg is None or stage_at(r, kimg) is not None)]
        if not recs:
            continue
        finals = [final(r) if kimg is None else stage_at(r, kimg) for r in recs]
        upto = [s for r in recs for k, s in r["stages"].items() if kimg is None or float(k) <= kimg]
        row = {"arm": arm.name, "claim": arm.claim, "group": arm.group, "x": arm.x, "seeds": len(recs),
               "overrides": " ".join(arm.overrides) or "(base)", "versus": arm.versus,
               "minutes": sum(s.get("train_seconds", 0.0) for s in upto) / 60,
               "cpu_minutes": sum(s.get("train_cpu_seconds", 0.0) + s.get("eval_cpu_seconds", 0.0)
                                  for s in upto) / 60}
        for key, _ in METRICS:
            vals = [f[key] * (100 if key.startswith("class_acc") else 1) for f in finals if key in f]
            row[key] = vals
        inst = [v for f in finals for k, v in f.items() if INST_FD.fullmatch(k)]  # not inst_fd_within_*
        row["inst_fd"] = inst
        row["curve"] = (sorted((float(k), s["fd_1step"]) for r in recs for k, s in r["stages"].items())
                        if arm.curve else [])
        rows.append(row)
    return rows


def call_difference(values: list[float], versus: list[float]) -> str:
    """The report's rule for a difference in FD (lower is better): called only when the two arms' seed ranges are
    disjoint and that would happen by chance for equal arms at most 10 % of the time, 2 / C(n + m, n) for n and m
    seeds (3 and 3 or more); "better" / "worse" says where ``values`` lies, else "no call"."""
    if not values or not versus:
        return ""
    if 2 / math.comb(len(values) + len(versus), len(values)) > 0.1 + 1e-9:
        return "no call"
    if max(values) < min(versus):
        return "better"
    if min(values) > max(versus):
        return "worse"
    return "no call"


RULE = ("A difference between two arms is called only when their seed ranges (min-max over seeds) are disjoint and "
        "both arms have enough seeds; otherwise it is \"no call\". For two arms that are in truth equal, the chance "
        "that n and m seeds fall into disjoint ranges is 2 / C(n+m, n): 10 % for 3 and 3 seeds (an exact two-sided "
        "rank test at p = 0.1), 33 % for 2 and 2, 50 % for 1 and 3; a call needs that chance to be at most 10 %.")


def write_report(out: Path, suite: str, arms: list[Arm], records: list[dict], settings: SuiteSettings,
                 skipped: dict) -> dict:
    budgets = settings.budgets
    by_budget = {b: arm_rows(arms, records, b) for b in budgets}
    lines = [f"# `pmf ablate --suite {suite}`: {', '.join(f'{b:g}' for b in budgets)} kimg per run, "
             f"{settings.eval_num} samples, base preset {settings.base}", "", RULE, "",
             "Mean (min-max) over seeds. Class accuracy in %; the demo classifier scores 91.35 % on real test images. "
             "\"call\" compares each arm with the arm the paper says beats it (better / worse / no call). CPU "
             "minutes: training subprocesses and evaluations, all seeds, up to that budget.", ""]
    claims = dict.fromkeys(r["claim"] for rows in by_budget.values() for r in rows)
    header = ("| arm | overrides | seeds | " + " | ".join(t for _, t in METRICS) +
              " | many-step FD | call 1-NFE / 2-NFE | train min (wall) | CPU min |")
    for claim in claims:
        lines += [f"## Claim {claim}", ""]
        measured = {b: [r for r in by_budget[b] if r["claim"] == claim] for b in budgets}
        measured = {b: rows for b, rows in measured.items() if rows}
        for b, rows in measured.items():
            names = {r["arm"]: r for r in rows}
            lines += [f"### {b:g} kimg", "", header, "|---|---|---|" + "---|" * (len(METRICS) + 4)]
            for r in rows:
                ref = names.get(r["versus"])
                vs = (f"{call_difference(r['fd_1step'], ref['fd_1step'])} / "
                      f"{call_difference(r['fd_2step'], ref['fd_2step'])} (vs {r['versus']})" if ref else "")
                lines.append(f"| {r['arm']} | `{r['overrides']}` | {r['seeds']} | " +
                             " | ".join(summarise(r[k]) for k, _ in METRICS) +
                             f" | {summarise(r['inst_fd'])} | {vs} | {r['minutes']:.1f} | {r['cpu_minutes']:.1f} |")
            lines.append("")
        if len(budgets) > 1 and not any(r["curve"] for rows in measured.values() for r in rows):
            figure = plot_budgets(out, claim, measured, budgets)
        else:
            figure = plot_claim(out, claim, measured[max(measured)])
        lines += [f"![claim {claim.split(':')[0]}]({figure.name})", ""]
    for name, keys in skipped.items():
        lines.append(f"- `{name}` skipped: needs {', '.join(keys)}")
    atomic_write_text(out / "report.md", "\n".join(lines).rstrip() + "\n")
    return {"rows": {f"{b:g}": rows for b, rows in by_budget.items()}, "skipped": skipped}


def plot_budgets(out: Path, claim: str, measured: dict, budgets: tuple) -> Path:
    """FD against the budget, 1-NFE (left) and 2-NFE (right), a line per arm; error bars span min-max over seeds.
    The x axis spans every budget asked for, measured or not yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    fig = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(fig)
    names = list(dict.fromkeys(r["arm"] for rows in measured.values() for r in rows))
    for col, (key, title) in enumerate(METRICS[:2]):
        ax = fig.add_subplot(1, 2, col + 1)
        for j, name in enumerate(names):
            pts = [(b, r[key]) for b, rows in measured.items() for r in rows if r["arm"] == name and r[key]]
            xs = np.asarray([b for b, _ in pts]) * (1 + 0.02 * (j - (len(names) - 1) / 2))  # apart, not on top
            m, lo, hi = (np.asarray([f(v) for _, v in pts]) for f in (np.mean, min, max))
            ax.errorbar(xs, m, yerr=[m - lo, hi - m], fmt="o-", capsize=3, label=name)
        ax.set_xscale("log")
        lo, hi = ax.get_ylim()
        if hi > 3 * lo:  # a collapsed arm far above the others: log scale, ticks labelled as plain numbers
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.set_xlim(min(budgets) / 1.3, max(budgets) * 1.3)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("kimg seen")
        ax.set_ylabel(title)
        ax.set_title(f"claim {claim}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"claim{claim.split(':')[0]}.png"
    fig.savefig(path, dpi=110)
    return path


def plot_claim(out: Path, claim: str, rows: list[dict]) -> Path:
    """One figure per claim: 1-NFE FD against per-token dimension (claim 1), against images seen (claim 2), or a bar
    per arm; error bars span min-max over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = any(r["curve"] for r in rows)
    fig = Figure(figsize=(9, 3.4) if curves else (5, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1) if curves else fig.add_subplot()
    if curves:  # left: FD against images seen, best of each sweep; right: the sweeps (seed 0, full budget)
        for r in rows:
            if r["curve"] and r["arm"].endswith("-best"):
                by_kimg: dict[float, list[float]] = {}
                for kimg, fd in r["curve"]:
                    by_kimg.setdefault(kimg, []).append(fd)
                xs = np.asarray(sorted(by_kimg))
                m, lo, hi = (np.asarray([f(by_kimg[k]) for k in xs]) for f in (np.mean, min, max))
                ax.errorbar(xs, m, yerr=[m - lo, hi - m], fmt="o-", capsize=3, label=r["arm"])
        ax.set_xlabel("kimg seen")
        sweep = fig.add_subplot(1, 2, 2)
        for group in dict.fromkeys(r["group"] for r in rows if r["x"] and not r["arm"].endswith("-best")):
            pts = sorted((r["x"], r["fd_1step"][0]) for r in rows
                         if r["group"] == group and r["x"] and not r["arm"].endswith("-best"))
            sweep.plot(*zip(*pts), "o-", label=group)
        sweep.set_xscale("log")
        sweep.set_xlabel("learning rate")
        sweep.set_ylabel("FD, 1 NFE, at the budget (seed 0)")
        if sweep.get_legend_handles_labels()[0]:
            sweep.legend(fontsize=7)
    elif all(r["x"] for r in rows):
        for group in dict.fromkeys(r["group"] for r in rows):
            pts = sorted((r["x"], np.mean(r["fd_1step"]), min(r["fd_1step"]), max(r["fd_1step"]))
                         for r in rows if r["group"] == group)
            xs, m, lo, hi = map(np.asarray, zip(*pts))
            ax.errorbar(xs, m, yerr=[m - lo, hi - m], fmt="o-", capsize=3, label=f"{group}-prediction")
        ax.set_xscale("log")
        ax.set_xlabel("values per token")
    else:
        m = [np.mean(r["fd_1step"]) for r in rows]
        err = [[a - min(r["fd_1step"]) for a, r in zip(m, rows)], [max(r["fd_1step"]) - a for a, r in zip(m, rows)]]
        ax.bar(range(len(rows)), m, yerr=err, capsize=3)
        ax.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=20, fontsize=7)
    ax.set_ylabel("FD, 1 NFE")
    ax.set_title(f"claim {claim}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"claim{claim.split(':')[0]}.png"
    fig.savefig(path, dpi=110)
    return path


def tokens_of(arm: Arm, settings: SuiteSettings) -> int:
    """Image tokens of the arm's network: (input size / patch size)^2 (the registry entry with the arm's overrides)."""
    from pmf.method.model import MODELS

    cfg = load_config(settings.base, None, run_overrides(arm, 0, settings))
    kw = {**MODELS[cfg.model.name].kwargs, **cfg.model.overrides}
    return (kw["input_size"] // kw["patch_size"]) ** 2


def dry_run(suite: str, settings: SuiteSettings, only: list[str] | None = None, imgs_per_s: float = 340.0,
            tokens_at_speed: int = 16, eval_s_per_ksample_nfe: float = 2.0) -> list:
    """Every arm with its overrides and seeds, and the estimated CPU time of its training runs (to the largest
    budget) and evaluations: ``imgs_per_s`` per one-thread run for networks of up to ``tokens_at_speed`` tokens,
    proportionally slower above (340 img/s: the demo network at patch 7, 16 tokens, on one thread of a 2-core AMD
    EPYC, 2026-12-03; patch 4, 49 tokens, ran at about 100), and ``eval_s_per_ksample_nfe`` CPU seconds per 1,000
    samples and network evaluation (sampling and classifier features; 58 s for 10,000 samples at 1 + 2 NFE at
    patch 7 on the same machine, 2026-12-07). Runs shared between arms are counted for each."""
    arms = select_arms(suite, only)
    out = []
    for a in arms:
        slowdown = max(1.0, tokens_of(a, settings) / tokens_at_speed)
        minutes = len(a.seeds) * max(settings.budgets) * 1000 / imgs_per_s * slowdown / 60
        nfe = sum(settings.eval_steps) * len(stages_of(a, settings)) + a.instantaneous_steps
        eval_minutes = len(a.seeds) * nfe * settings.eval_num / 1000 * eval_s_per_ksample_nfe * slowdown / 60
        out.append({"arm": a.name, "claim": a.claim, "overrides": list(a.overrides), "seeds": list(a.seeds),
                    "est_cpu_minutes": round(minutes + eval_minutes, 3), "est_eval_cpu_minutes": round(eval_minutes, 3),
                    "skipped": missing_files(a, settings) or None})
    return out
