"""Stability: NaN/Inf and D-collapse detection, rollback to the last stable checkpoint, best.json, pruning.

Single process (no Ray): the loop is the same code the Ray workers run. Instability is injected into the
statistics of a real trainer, so everything else (checkpoints, restore, reseed) runs for real.
"""

from __future__ import annotations

import json
import logging
import math
import os

import pytest

from styleray.datasets.read.folder import BatchSampler, load_image_folder
from styleray.models.training import StyleGAN2Trainer
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.train.loop import run_training
from styleray.platform.train.stability import StabilityMonitor, TrainingDiverged


class FlakyTrainer(StyleGAN2Trainer):
    """Reports broken statistics for images (lo, hi] until the first rollback restores a checkpoint."""

    def __init__(self, *args, lo: int, hi: int, kind: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.lo, self.hi, self.kind, self.rolled_back = lo, hi, kind, False

    def load_state_dict(self, state):
        self.rolled_back = True
        super().load_state_dict(state)

    def step(self, real, c=None):
        stats = super().step(real, c)
        if self.lo < self.cur_nimg <= self.hi and not self.rolled_back:
            if self.kind == "nan":
                stats["loss_G"] = float("nan")
            else:  # D wins outright while G's loss climbs
                stats["loss_D"] = 0.001
                stats["loss_G"] = 5.0 + self.cur_nimg / 10
        return stats


def _train(tiny_data, tiny_run, out, *, lo, hi, kind, **train):
    run = tiny_run(tiny_data, out, workers=1, batch=4, kimg=0.12, tick=0.02, snap=1, **train)
    data = load_image_folder(tiny_data)
    data.labels, data.num_classes = None, 0
    sampler = BatchSampler(data, 4, seed=0)
    trainer = FlakyTrainer(run.model, run.train, "cpu", lo=lo, hi=hi, kind=kind)
    return run_training(run, sampler, resume=None, trainer=trainer, hooks=_quiet())


def _quiet():
    from styleray.platform.train.loop import LoopHooks

    return LoopHooks(progress=False)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_monitor_flags_nan_at_once_and_collapse_after_m_ticks():
    m = StabilityMonitor(unstable_ticks=3, collapse_d_loss=0.05)
    assert m.observe({"loss_G": 1.0, "loss_D": 1.2}).unstable is False
    v = m.observe({"loss_G": math.inf, "loss_D": 1.0})
    assert v.unstable and v.rollback and "loss_G" in v.reason

    m = StabilityMonitor(unstable_ticks=3, collapse_d_loss=0.05)
    m.observe({"loss_G": 1.0, "loss_D": 0.01})  # no previous G loss: cannot be climbing
    verdicts = [m.observe({"loss_G": 2.0 + i, "loss_D": 0.01}) for i in range(3)]
    assert [v.rollback for v in verdicts] == [False, False, True]
    assert all(v.unstable for v in verdicts) and "D loss" in verdicts[0].reason
    assert not m.stable
    # a healthy tick ends the streak
    assert m.observe({"loss_G": 1.0, "loss_D": 1.0}).unstable is False and m.stable
    # D near zero while G falls is not a collapse
    m.observe({"loss_G": 3.0, "loss_D": 0.01})
    assert m.observe({"loss_G": 2.0, "loss_D": 0.01}).unstable is False


def test_collapse_rolls_back_to_last_stable_checkpoint(tiny_data, tiny_run, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.WARNING)
    # ticks of 20 images: ticks 4 and 5 (images 61..100) collapse; M = 2 -> rollback at tick 5 to tick 3's ckpt
    summary = _train(tiny_data, tiny_run, out, lo=60, hi=100, kind="collapse", unstable_ticks=2)
    assert summary["kimg"] == pytest.approx(0.12)
    assert summary["rollbacks"] == 1
    records = _metrics(out)
    by_tick = [(r["tick"], r.get("unstable", False), r.get("rollback_to")) for r in records]
    assert by_tick[:5] == [
        (1, False, None), (2, False, None), (3, False, None), (4, True, None), (5, True, "ckpt-000000000060"),
    ]
    assert "D loss" in records[3]["unstable_reason"]
    # after the rollback training resumed at tick 4 and finished stable
    assert [r["tick"] for r in records[5:]] == [4, 5, 6]
    assert not any(r.get("unstable") for r in records[5:])
    assert all(r["rollbacks"] == 1 for r in records[5:])
    # the unstable tick-4 checkpoint was discarded, then retaken after the rollback as a stable one
    assert any("discarded" in m and "ckpt-000000000080" in m for m in caplog.messages)
    meta80 = ckpt_lib.load_checkpoint(str(out / "checkpoints" / "ckpt-000000000080")).meta
    assert meta80["stable"] is True and meta80["rollbacks"] == 1
    best = json.loads((out / "best.json").read_text())
    assert best["checkpoint"] == "ckpt-000000000120" and best["criterion"] == "newest-stable"


def test_pruning_keeps_the_best_stable_checkpoint(tiny_data, tiny_run, tmp_path):
    out = tmp_path / "run"
    # collapse from tick 4 to the end, never long enough to roll back: the last stable checkpoint is tick 3's
    summary = _train(tiny_data, tiny_run, out, lo=60, hi=120, kind="collapse", unstable_ticks=10, keep_checkpoints=2)
    assert summary["rollbacks"] == 0
    assert [r.get("unstable", False) for r in _metrics(out)] == [False, False, False, True, True, True]
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["ckpt-000000000060", "ckpt-000000000100", "ckpt-000000000120"]
    best = json.loads((out / "best.json").read_text())
    assert best["checkpoint"] == "ckpt-000000000060" and best["tick"] == 3
    assert ckpt_lib.load_checkpoint(str(out / "checkpoints" / "ckpt-000000000120")).meta["stable"] is False


def test_nan_beyond_max_rollbacks_stops_with_a_clear_error(tiny_data, tiny_run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="--max-rollbacks 0"):
        _train(tiny_data, tiny_run, out, lo=40, hi=60, kind="nan", max_rollbacks=0)
    last = _metrics(out)[-1]
    assert last["tick"] == 3 and last["unstable"] is True and "non-finite loss_G" in last["unstable_reason"]
    assert json.loads((out / "best.json").read_text())["checkpoint"] == "ckpt-000000000040"


def test_nan_before_any_checkpoint_restarts_from_scratch(tiny_data, tiny_run, tmp_path):
    out = tmp_path / "run"
    run = tiny_run(tiny_data, out, workers=1, batch=4, kimg=0.06, tick=0.02, snap=2)
    data = load_image_folder(tiny_data)
    data.labels, data.num_classes = None, 0
    trainer = FlakyTrainer(run.model, run.train, "cpu", lo=0, hi=20, kind="nan")
    summary = run_training(run, BatchSampler(data, 4, seed=0), resume=None, trainer=trainer, hooks=_quiet())
    records = _metrics(out)
    assert records[0]["unstable"] is True and records[0]["rollback_to"] is None
    assert [r["tick"] for r in records[1:]] == [1, 2, 3]
    assert summary["rollbacks"] == 1 and summary["kimg"] == pytest.approx(0.06)
    assert summary["trainer"] is not trainer
