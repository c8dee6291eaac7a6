"""`styleray tune`: the search space and the objective checked up front, then real sweeps on the private
2-CPU Ray cluster: a 2-trial PBT sweep (cpu-tiny, 1 worker per trial) that exploits, completes and ranks,
and a sweep (optuna + ASHA) killed after its first report that resumes with --resume and completes.

The two sweeps cover the issue's three sweep tests; the 2-trial sweep is the PBT one, because every trial
start costs tens of seconds on this machine."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from styleray import cli
from styleray.models import metrics
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.tune import driver as sweeps
from styleray.platform.tune.space import parse_space
from styleray.settings import from_command_line
from metrics_helpers import tiny_extractor_spec

TRIAL_TRAIN = "preset: cpu-tiny\nbatch: 8\ntick: 0.016\nsnap: 1\n"  # a tick = 2 steps of 8 images, a report


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Checked before anything runs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc, message", [
    ({"lr_q": {"choice": [1]}}, "unknown hyperparameter 'lr_q'; the space covers lr, lr_g"),
    ({"gamma": {"normal": [0, 1]}}, "gamma must be a constant or one of {choice: [...]}"),
    ({"lr_g": {"loguniform": [0, 0.01]}}, "space.yaml: lr_g (--lr-g) = 0: must be > 0"),
    ({"lr_g": {"uniform": [0.01, 0.001]}}, "uniform needs [low, high] with low < high"),
    ({"batch": {"uniform": [8, 16]}}, "batch takes whole values or true/false: use choice or grid"),
    ({"target": {"choice": [0.6, 1.5]}}, "space.yaml: target (--target) = 1.5: must be in (0, 1)"),
    ({"mirror": {"choice": ["yes"]}}, "space.yaml: mirror (--mirror) = 'yes': a switch: write true or false"),
    ({"batch": {"choice": [8, 12.5]}}, "space.yaml: batch (--batch) = 12.5: expected a whole number"),
    ({"lr": 0.002, "lr_g": {"choice": [0.1]}}, "give lr (both networks) or lr_g/lr_d, not both"),
    ({"gamma": 1.0}, "every value is a constant"),
    (["lr_g"], "expected a mapping of hyperparameters"),
])
def test_bad_space_is_rejected_naming_the_key(doc, message):
    with pytest.raises(ValueError) as e:
        parse_space(doc, "space.yaml")
    assert message in str(e.value)


def test_space_suits_the_search_and_the_scheduler():
    space = parse_space({"lr_g": {"loguniform": [1e-4, 1e-2]}, "map": {"grid": [1, 2]}, "batch": {"choice": [8, 16]},
                         "mirror": True})
    with pytest.raises(ValueError, match="--search grid needs discrete values, but space.yaml: lr_g is loguniform"):
        space.check_search("grid", "none")
    with pytest.raises(ValueError, match=r"--search optuna samples distributions, but space.yaml: map is a grid"):
        space.check_search("optuna", "asha")
    assert space.grid_size() == 2 and set(space.pbt_mutations()) == {"lr_g"}  # batch and map shape the networks
    assert space.num_trials("random", 3) == 6 and space.num_trials("optuna", 3) == 3
    discrete = parse_space({"map": {"grid": [1, 2]}, "batch": {"choice": [8, 16, 32]}, "mirror": True})
    assert discrete.num_trials("grid", 99) == 6 and discrete.tune_space("grid")["batch"] == {"grid_search": [8, 16, 32]}
    with pytest.raises(ValueError, match="--scheduler pbt perturbs .* varies none of them"):
        parse_space({"map": {"choice": [1, 2]}}).check_search("random", "pbt")
    tuned = space.tune_space("random")
    assert tuned["mirror"] is True and tuned["map"] == {"grid_search": [1, 2]}


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="hyperband"), "--scheduler 'hyperband' is unknown; choose one of asha, pbt, none"),
    (dict(search="bayes"), "--search 'bayes' is unknown; choose one of grid, random, optuna"),
    (dict(metric="lpips"), "--metric 'lpips' is unknown; choose one of auto, fid, kid, pixel-fid, pixel-kid"),
    (dict(scheduler="pbt", search="optuna"), "--scheduler pbt changes hyperparameters during trials"),
    (dict(scheduler="pbt", trials=1), "--scheduler pbt needs a population: --trials 1 must be >= 2"),
])
def test_bad_sweep_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError) as e:
        sweeps.SweepConfig(out="o", space_file="s", base={"data": "d"}, **kwargs)
    assert message in str(e.value)


def test_the_objective_is_named_and_never_a_silent_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    auto = sweeps.resolve_objective("auto")
    assert (auto.name, auto.key, auto.extractor, auto.proxy) == ("pixel-fid", "fid", "pixels-8x8", True)
    assert "PROXY for FID" in auto.note and "Inception-v3 weights are missing" in auto.note
    with pytest.raises(ValueError, match="--metric fid: Inception-v3 FID weights .* --metric pixel-fid"):
        sweeps.resolve_objective("fid")
    with pytest.raises(ValueError, match="not found"):  # a file the user names must exist, even with auto
        sweeps.resolve_objective("auto", inception=str(tmp_path / "missing.pth"))
    kid = sweeps.resolve_objective("pixel-kid")
    assert (kid.name, kid.key, kid.proxy) == ("pixel-kid", "kid", True)
    weights = tmp_path / "empty-cache" / "styleray" / metrics.INCEPTION_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")  # found (loading it is the metrics package's business)
    assert sweeps.resolve_objective("auto").name == "fid" and not sweeps.resolve_objective("auto").proxy


def test_results_rank_trials_by_their_lowest_objective(tmp_path):
    """Lower is better; a trial that never reported the objective comes last; the objective is stated."""
    import pandas as pd

    from styleray.platform.tune import results as tune_results

    class Result:  # the parts of ray.tune.Result the table reads
        def __init__(self, trial, values, error=None):
            self.metrics = {"styleray_trial": trial, "kimg": 0.5, "tick": 3, **({"fid": values[-1]} if values else {})}
            self.metrics_dataframe = pd.DataFrame({"fid": values}) if values else None
            self.config, self.error, self.path = {"gamma": 0.1}, error, str(tmp_path / trial)

    objective = sweeps.Objective("pixel-fid", "fid", "pixels-8x8", None, True, "PROXY for FID")
    rows = tune_results.rank_rows([tune_results._trial_row(r, objective, ("gamma",)) for r in [
        Result("a", [50.0, 40.0, 45.0]), Result("b", [], error=RuntimeError("boom\nmore")), Result("c", [42.0, 30.0]),
    ]], objective)
    assert [(r["rank"], r["trial"], r["best_pixel-fid"], r["last_pixel-fid"]) for r in rows] == \
        [(1, "c", 30.0, 30.0), (2, "a", 40.0, 45.0), (3, "b", None, None)]
    assert rows[2]["status"] == "error" and rows[2]["error"] == "boom"
    md = tune_results.to_markdown(rows, objective, "Sweep")
    assert "Objective: **pixel-fid**, lower is better: PROXY for FID." in md and "- b: boom" in md
    assert tune_results.to_csv(rows).splitlines()[0].startswith("rank,trial,status,best_pixel-fid")


def test_a_ray_train_snapshot_naming_pruned_checkpoints_is_set_aside(tmp_path):
    """Ray Train refuses to start in a run folder whose snapshot names a missing checkpoint (pruned by --keep,
    set aside by an exploit); styleray resumes from its own checkpoints, so the snapshot goes aside."""
    from styleray.platform.train.ray_train import TRAIN_SNAPSHOT, retire_stale_train_snapshot

    (tmp_path / "checkpoints" / "ckpt-000000000032").mkdir(parents=True)
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoints/ckpt-000000000032"}]}
    (tmp_path / TRAIN_SNAPSHOT).write_text(json.dumps(snapshot))
    retire_stale_train_snapshot(str(tmp_path))
    assert (tmp_path / TRAIN_SNAPSHOT).exists()  # everything it names is there: kept
    snapshot["checkpoint_results"].insert(0, {"checkpoint_dir_name": "checkpoints/ckpt-000000000016"})
    (tmp_path / TRAIN_SNAPSHOT).write_text(json.dumps(snapshot))
    retire_stale_train_snapshot(str(tmp_path))
    assert not (tmp_path / TRAIN_SNAPSHOT).exists() and (tmp_path / (TRAIN_SNAPSHOT + ".stale")).exists()


# ---------------------------------------------------------------------------------------------------------
# Real sweeps
# ---------------------------------------------------------------------------------------------------------


def _trial_dirs(out) -> list[str]:
    return sorted(glob.glob(os.path.join(out, sweeps.TRIALS_DIR, "*")))


def _check_results(out, trials: int, objective: str) -> list[dict]:
    with open(os.path.join(out, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == trials and [r["rank"] for r in rows] == [str(i + 1) for i in range(trials)]
    values = [float(r[f"best_{objective}"]) for r in rows if r[f"best_{objective}"]]
    assert values and values == sorted(values)
    md = open(os.path.join(out, "results.md")).read()
    assert f"Objective: **{objective}**" in md and rows[0]["trial"] in md
    return rows


@pytest.mark.slow
def test_pbt_sweep_exploits_completes_and_ranks(ray_local, tiny_data, tmp_path):
    """Two trials of cpu-tiny (1 worker each, 4 ticks), measured every tick with an extractor built here,
    synchronous PBT perturbing at tick 2: the worse trial copies the better one's checkpoint and trains on from
    it (synchronous, so that the exploit does not depend on which trial reports first)."""
    name = "test-tune-feats"
    metrics.register_extractor(tiny_extractor_spec(name), replace=True)
    try:
        out = tmp_path / "sweep"
        space = _write(tmp_path / "space.yaml",
                       "lr_g: {choice: [0.00005, 0.004]}\nlr_d: {loguniform: [0.001, 0.004]}\ngamma: 0.1\n")
        sweep = sweeps.SweepConfig(
            out=str(out), space_file=space, trials=2, scheduler="pbt", search="random",
            metric="fid", extractor=name, workers_per_trial=1, num_gen=32, perturbation_interval=2, pbt_sync=True,
            seed=3, base={**yaml.safe_load(TRIAL_TRAIN), "data": tiny_data, "kimg": 0.064},
        )
        summary = sweeps.run_sweep(sweep)
        best_yaml = summary["best_config"]
        args = cli.build_parser().parse_args(["train", "--config", best_yaml, "--out", str(tmp_path / "again")])
        best = from_command_line(args, args.config)
        assert best.metrics == ("fid", "kid") and best.extractor == name
    finally:
        metrics.EXTRACTORS.pop(name, None)

    assert summary["objective"] == f"fid@{name}"
    rows = _check_results(str(out), 2, f"fid@{name}")
    trial_ids = [os.path.basename(d) for d in _trial_dirs(out)]
    assert sorted(r["trial"] for r in rows) == trial_ids

    # PBT exploited: a trial copied the other's checkpoint into its run folder and resumed from it
    exploits = [json.loads(line) for d in _trial_dirs(out) if os.path.exists(os.path.join(d, "exploits.jsonl"))
                for line in open(os.path.join(d, "exploits.jsonl"))]
    assert exploits, "PBT performed no exploit"
    ex = exploits[0]
    assert ex["from_trial"] != ex["trial_id"] and {ex["from_trial"], ex["trial_id"]} == set(trial_ids)
    adopted = ckpt_lib.load_checkpoint(ex["checkpoint"]) if os.path.exists(ex["checkpoint"]) else None
    if adopted is not None:  # (a later exploit may have set it aside again)
        assert adopted.config["out"] == os.path.join(str(out), "trials", ex["from_trial"])  # the donor's run
    records = [json.loads(line) for line in open(os.path.join(str(out), "trials", ex["trial_id"], "metrics.jsonl"))]
    assert any(r["resumed_kimg"] == pytest.approx(ex["kimg"]) for r in records)  # it trained on from there
    assert int(rows[[r["trial"] for r in rows].index(ex["trial_id"])]["exploits"]) >= 1

    # best_config.yaml is the best trial's complete settings: `train --config` builds its run config
    run = best.resolve(16, 3, 0)
    best_dir = os.path.join(str(out), "trials", rows[0]["trial"])
    trained = json.load(open(os.path.join(best_dir, "config.json")))
    assert run.train.lr_g == pytest.approx(trained["train"]["lr_g"])
    assert run.train.lr_d == pytest.approx(trained["train"]["lr_d"])
    assert run.to_dict()["model"] == trained["model"]
    assert json.loads(json.dumps(run.to_dict()["train"])) == trained["train"]


@pytest.mark.slow
def test_killed_sweep_resumes_and_completes(ray_local, tiny_data, tmp_path, capsys):
    """`styleray tune` (optuna + ASHA, proxy objective, 2 workers per trial: the measured images are split
    over them and gathered) in a subprocess on this cluster, killed (SIGKILL) after the first trial report;
    `styleray tune --resume` finishes it from the trials' checkpoints."""
    out = tmp_path / "sweep"
    space = _write(tmp_path / "space.yaml", "lr_g: {loguniform: [0.001, 0.004]}\nmap: {choice: [1, 2]}\n")
    argv = ["tune", "--data", tiny_data, "--out", str(out), "--space", space, "--trials", "2", "--scheduler", "asha",
            "--search", "optuna", "--metric", "pixel-fid", "--metrics-num-gen", "33", "--kimg", "0.064",
            "--workers-per-trial", "2", "--cpus-per-worker", "0.45",
            "--train-config", _write(tmp_path / "train.yaml", TRIAL_TRAIN)]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, RAY_USAGE_STATS_ENABLED="0")
    log = open(tmp_path / "tune.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "styleray.cli", *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # wait for evidence: a report and Tune's state
            reported = any(os.path.getsize(p) > 0 for p in glob.glob(str(out / "trials" / "*" / "metrics.jsonl")))
            if reported and glob.glob(str(out / "tune" / "experiment_state*.json")):
                break
            time.sleep(0.5)
        assert proc.poll() is None, open(tmp_path / "tune.log").read()[-3000:]
        assert time.time() < deadline, "no trial reported within 240 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "results.csv").exists()
    before = {os.path.basename(d): len(open(os.path.join(d, "metrics.jsonl")).readlines())
              for d in _trial_dirs(out) if os.path.exists(os.path.join(d, "metrics.jsonl"))}

    assert cli.main(["tune", "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "sweep objective: pixel-fid (PROXY for FID" in printed
    rows = _check_results(str(out), 2, "pixel-fid")
    # the trials that had started went on from their checkpoints instead of starting over
    for trial, lines in before.items():
        records = [json.loads(line) for line in open(out / "trials" / trial / "metrics.jsonl")]
        assert len(records) >= lines
        if len(records) > lines:
            assert records[lines]["resumed_kimg"] > 0 or records[lines]["tick"] == 1
    config = json.load(open(out / "trials" / rows[0]["trial"] / "config.json"))
    assert config["train"]["workers"] == 2 and float(rows[0]["kimg"]) == pytest.approx(0.064)
    assert any(r["status"] == "finished" for r in rows) and all(r["status"] in ("finished", "stopped") for r in rows)
    assert yaml.safe_load(open(out / "best_config.yaml"))["extractor"] == "pixels-8x8"
