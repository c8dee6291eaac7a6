"""Checkpoint hygiene without Ray: corrupt and partial checkpoints are skipped, pruning keeps what it must,
a rollback discards the future, a resume refuses another model."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from styleray.datasets.read.folder import BatchSampler, load_image_folder
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.train import ray_train
from styleray.platform.train.loop import LoopHooks, run_training


def _save(run_dir, nimg: int) -> str:
    state = {"w": torch.full([4], float(nimg))}
    return ckpt_lib.save_checkpoint(str(run_dir), state, config={}, meta={"cur_nimg": nimg, "kimg": nimg / 1000})


def test_corrupt_and_partial_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    for nimg in (10, 20, 30):
        _save(tmp_path, nimg)
    newest = tmp_path / "checkpoints" / "ckpt-000000000030" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:-7] + b"garbage")  # corrupt: the hash no longer matches
    os.remove(tmp_path / "checkpoints" / "ckpt-000000000020" / "meta.json")  # partial: never committed
    caplog.set_level(logging.WARNING)
    ck = ckpt_lib.load_latest(str(tmp_path))
    assert ck.name == "ckpt-000000000010" and ck.state["w"][0] == 10
    assert any("corrupt" in m for m in caplog.messages) and any("no meta.json" in m for m in caplog.messages)
    # a preferred (e.g. registered) checkpoint that is broken falls back to an older one
    assert ckpt_lib.load_preferred(str(newest.parent), str(tmp_path)).name == "ckpt-000000000010"


def test_prune_keeps_the_protected_and_discard_newer_drops_the_future(tmp_path):
    for nimg in (10, 20, 30, 40, 50):
        _save(tmp_path, nimg)
    deleted = ckpt_lib.prune(str(tmp_path), keep=2, protect={"ckpt-000000000010"})
    assert [os.path.basename(u) for u in deleted] == ["ckpt-000000000020", "ckpt-000000000030"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-000000000010", "ckpt-000000000040", "ckpt-000000000050"]
    assert [os.path.basename(u) for u in ckpt_lib.discard_newer(str(tmp_path), "ckpt-000000000040")] == ["ckpt-000000000050"]
    ckpt_lib.write_best(str(tmp_path), {"checkpoint": "ckpt-000000000010"})
    assert ckpt_lib.read_best(str(tmp_path)) == {"checkpoint": "ckpt-000000000010"}
    (tmp_path / "best.json").write_text("{not json")
    assert ckpt_lib.read_best(str(tmp_path)) is None


def test_resume_checks_on_the_driver(tmp_path, tiny_data, tiny_run):
    run = tiny_run(tiny_data, tmp_path / "run", workers=1, batch=4, kimg=0.02, tick=0.02, snap=1)
    data = load_image_folder(tiny_data)
    data.labels, data.num_classes = None, 0
    run_training(run, BatchSampler(data, 4), resume=None, hooks=LoopHooks(progress=False))
    with pytest.raises(ValueError, match="--resume none, but --out .* already holds checkpoints"):
        ray_train.check_resume(None, run.out)
    other = tmp_path / "other"
    assert ray_train.check_resume(run.out, str(other)).endswith("ckpt-000000000020")  # a run folder: its newest
    with pytest.raises(ValueError, match="--resume .*nothing: .*neither a checkpoint folder"):
        ray_train.check_resume(str(tmp_path / "nothing"), str(other))
    # a checkpoint of another model cannot be resumed into this one
    bigger = tiny_run(tiny_data, other, workers=1, batch=4, kimg=0.04, tick=0.02, cond=True)
    with pytest.raises(ValueError, match=r"c_dim: checkpoint 0 vs run 2"):
        run_training(bigger, BatchSampler(data, 4), resume=run.out, hooks=LoopHooks(progress=False))
    meta = json.loads((tmp_path / "run" / "checkpoints" / "ckpt-000000000020" / "meta.json").read_text())
    assert meta["replicas"] and meta["stable"] is True and meta["last_good"] == "ckpt-000000000020"
