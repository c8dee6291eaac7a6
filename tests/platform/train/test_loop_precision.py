"""--precision in the training loop: the tick record says which precision ran, and a checkpoint trained in
another precision (a V100 run's fp16, resumed on a CPU or another card) resumes: precision is how the model runs,
not what it is. Single process, a real trainer and real checkpoints."""

from __future__ import annotations

import json
import logging
import os

from styleray.datasets.read.folder import BatchSampler, load_image_folder
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.train.loop import LoopHooks, run_training


def _records(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_tick_record_names_the_precision_and_another_precision_resumes(tiny_data, tiny_run, tmp_path, caplog):
    out = tmp_path / "run"
    data = load_image_folder(tiny_data)
    data.labels, data.num_classes = None, 0
    run = tiny_run(tiny_data, out, workers=1, batch=4, kimg=0.008, tick=0.004)
    with caplog.at_level(logging.INFO, logger="styleray.platform.train.loop"):
        run_training(run, BatchSampler(data, 4, seed=0), resume=None, hooks=LoopHooks(progress=False))
    assert [r["precision"] for r in _records(out)] == ["fp32", "fp32"]
    assert "4 images per worker per iteration in rounds of 4; precision fp32 (cpu:" in caplog.text

    # The newest checkpoint as a run with another reduced precision wrote it: the model config says fp16.
    ck = ckpt_lib.load_latest(str(out))
    assert ck.state["model_cfg"]["mixed_precision"] == "bf16"  # the preset's, as asked (fp32 ran on the CPU)
    ck.state["model_cfg"]["mixed_precision"] = "fp16"
    ckpt_lib.save_checkpoint(str(out), ck.state, config=ck.config, meta=ck.meta)  # replaces it
    assert ckpt_lib.load_latest(str(out)).state["model_cfg"]["mixed_precision"] == "fp16"
    more = tiny_run(tiny_data, out, workers=1, batch=4, kimg=0.016, tick=0.004)
    summary = run_training(more, BatchSampler(data, 4, seed=0), resume="latest", hooks=LoopHooks(progress=False))
    assert summary["kimg"] >= 0.016 and _records(out)[-1]["resumed_kimg"] == 0.008
