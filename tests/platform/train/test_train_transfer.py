"""--init-from and --freeze-d: the source's model is used and every contradicting setting is named with its fix;
a run starts from the source (kimg 0, fresh optimizers and ADA p), keeps FreezeD's layers, resumes from its own
checkpoints without the source, on one process and on two Ray Train workers; sweeps and the queue resolve the
same way. Sources are an NVIDIA-structured pickle (tests/nvidia_fixture.py) and a styleray checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import pytest
import torch

import nvidia_fixture as nf
from styleray.config import ModelConfig, resolve_preset
from styleray.models.training import StyleGAN2Trainer
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.train.run import train
from styleray.platform.train.transfer import read_source, resolve_run
from styleray.settings import SettingsError, TrainSettings, from_argv

TINY, _ = resolve_preset("cpu-tiny", resolution=16)  # the source's architecture: cpu-tiny at 16 px


@pytest.fixture(scope="module")
def pkl(tmp_path_factory):
    """An unconditional NVIDIA-structured snapshot of cpu-tiny at 16 px (augment p 0.3)."""
    path = tmp_path_factory.mktemp("src") / "network-snapshot-000100.pkl"
    G, D, G_ema = nf.random_networks(TINY)
    path.write_bytes(nf.dump(nf.snapshot(G, D, G_ema, augment_p=0.3)))
    return str(path), {"G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict()}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A styleray run folder (cpu-tiny, map 3) with one checkpoint."""
    model, train_cfg = resolve_preset("cpu-tiny", resolution=16, model_overrides={"mapping_layers": 3},
                                      train_overrides={"batch": 8})
    tr = StyleGAN2Trainer(model, train_cfg)
    out = str(tmp_path_factory.mktemp("runs") / "source")
    ckpt_lib.save_checkpoint(out, tr.state_dict(), config={}, meta={"cur_nimg": 800, "kimg": 0.8, "tick": 1})
    return out


def settings(data, out, **kw) -> TrainSettings:
    return TrainSettings(data=str(data), out=str(out), **{"preset": "cpu-tiny", "batch": 8, **kw})


def test_the_source_model_is_used_and_pinned(pkl, source_run, tiny_data, tmp_path):
    run = resolve_run(settings(tiny_data, tmp_path / "a", preset="auto", init_from=pkl[0]), 16, 3, 2)
    assert run.model == TINY and run.init_from == pkl[0]  # 'auto' would have built another network
    run = resolve_run(settings(tiny_data, tmp_path / "b", init_from=source_run, map=3, freeze_d=4), 16, 3, 2)
    assert run.model.mapping_layers == 3 and run.train.freeze_d == 4
    with pytest.raises(SettingsError, match=r"mapping depth: the source has 3, --preset cpu-tiny 2 \(add --map 3, or "
                                            "drop --preset"):
        resolve_run(settings(tiny_data, tmp_path / "b", init_from=source_run), 16, 3, 2)
    assert run.init_from == ckpt_lib.list_checkpoints(source_run)[-1]  # the run folder's newest checkpoint


def test_every_contradiction_is_listed_with_its_fix(pkl, tiny_data, tmp_path):
    s = settings(tiny_data, tmp_path / "r", init_from=pkl[0], resolution=32, map=4, preset="paper256", batch=6)
    with pytest.raises(SettingsError) as e:
        resolve_run(s, 16, 1, 2)
    message = str(e.value)
    for part in ("resolution: the source is 16 px, this run 32 px (train on data prepared at 16 px: styleray "
                 "prepare ... --resolution 16, with --resolution 16 or none)",
                 "channels: the source makes 3-channel images", "mapping depth: the source has 2 layers, --map 4",
                 "channel base: the source has 2048, --preset paper256", "drop --preset",
                 "minibatch-std group: the source's is 4, and --batch 6 over --workers 1 is 6 per worker (try --batch 8)"):
        assert part in message, part
    assert "\n" not in message
    rounds = settings(tiny_data, tmp_path / "r", init_from=pkl[0], preset="paper256", batch=12, batch_gpu=6)
    with pytest.raises(SettingsError, match=r"minibatch-std group: the source's is 4, and --batch-gpu 6 rounds cannot "
                                            r"be split into groups of 4 \(make --batch-gpu a multiple of 4\)"):
        resolve_run(rounds, 16, 3, 0)  # D groups within a round: the rounds, not the worker's 12, must divide
    with pytest.raises(SettingsError, match=r"prepared at 16 px: styleray prepare ... --resolution 16\)"):
        resolve_run(settings(tiny_data, tmp_path / "r", init_from=pkl[0]), 32, 3, 2)


def test_bad_sources_and_flags_are_one_line_errors(pkl, tmp_path, tiny_data):
    empty_run = tmp_path / "empty"
    (empty_run / "checkpoints").mkdir(parents=True)
    (tmp_path / "folder").mkdir()
    (tmp_path / "tf.pkl").write_bytes(nf.tf_era_pickle())
    for source, message in ((tmp_path / "nope", "does not exist"), (empty_run, "no loadable checkpoint"),
                            (tmp_path / "folder", "is a folder with no checkpoints"),
                            (tmp_path / "tf.pkl", "TensorFlow-era pickle")):
        with pytest.raises(SettingsError, match=message):
            read_source(str(source))
    with pytest.raises(SettingsError, match="--freeze-d.* = 8: the discriminator at 16 px has 7 layers"):
        resolve_run(settings(tiny_data, tmp_path / "r", init_from=pkl[0], freeze_d=8), 16, 3, 2)
    with pytest.raises(SettingsError, match="give one of them"):
        settings(tiny_data, tmp_path / "r", init_from=pkl[0], resume=str(tmp_path / "other"))
    with pytest.raises(SettingsError, match=r"freeze_d \(--freeze-d\) = -1: must be >= 0"):
        settings(tiny_data, tmp_path / "r", freeze_d=-1)


def test_the_queue_and_sweeps_carry_and_resolve_the_settings(pkl, tiny_data, tmp_path):
    from styleray.platform.manager.requests import resolve_config
    from styleray.platform.tune.sweep import SweepConfig, trial_run_config

    s = settings(tiny_data, tmp_path / "r", init_from=pkl[0], freeze_d=3, cond=True)
    argv = s.to_argv()
    assert argv[argv.index("--init-from") + 1] == pkl[0] and argv[argv.index("--freeze-d") + 1] == "3"
    assert from_argv(argv) == s
    assert resolve_config(s)["init_from"] == pkl[0]
    with pytest.raises(ValueError, match="mapping depth"):
        resolve_config(dataclasses.replace(s, map=5))
    sweep = SweepConfig(out=str(tmp_path / "sweep"), space_file="space.yaml", base=s.changed(portable_only=True))

    class Info:
        resolution, channels, num_classes = 16, 3, 2

    run = trial_run_config(sweep, {"lr_g": 0.001}, str(tmp_path / "trial"), Info)
    assert run.init_from == pkl[0] and run.model == dataclasses.replace(TINY, c_dim=2) and run.train.freeze_d == 3


@pytest.mark.slow
def test_a_run_starts_from_the_source_keeps_freeze_d_and_resumes_without_it(pkl, tiny_data, tmp_path, caplog, helpers):
    """--no-ray: an unconditional pickle starts a conditional run (2 framing classes) with FreezeD 2."""
    src = tmp_path / "snapshot.pkl"
    shutil.copy(pkl[0], src)
    out = tmp_path / "run"
    s = settings(tiny_data, out, init_from=str(src), freeze_d=2, cond=True, kimg=0.032, tick=0.016, snap=1,
                 no_ray=True, no_progress=True, device="cpu")
    with caplog.at_level(logging.INFO):
        summary = train(s)
    assert "new class embedding" in caplog.text and f"started from {src}" in caplog.text
    first = ckpt_lib.load_checkpoint(summary["checkpoint"])
    assert first.kimg == pytest.approx(0.032)  # counted from 0, not from the source's kimg
    assert first.state["augment_pipe"]["p"].item() < 0.05  # the run's own ADA p (from 0), not the source's 0.3
    D = first.state["D"]
    for layer in ("blocks.0.fromrgb", "blocks.0.conv0"):  # frozen: still the source's
        assert torch.equal(D[f"{layer}.weight"], pkl[1]["D"][f"{layer}.weight"]), layer
    assert not torch.equal(D["blocks.0.conv1.weight"], pkl[1]["D"]["blocks.0.conv1.weight"])  # trained
    assert D["b4.out.weight"].shape[0] > 1  # the new projection head
    assert json.loads((out / "config.json").read_text())["init_from"] == str(src)

    os.remove(src)  # a resumed run never reads its source again
    summary = train(dataclasses.replace(s, kimg=0.064))
    assert summary["resumed_kimg"] == pytest.approx(0.032) and summary["kimg"] == pytest.approx(0.064)
    assert [r["resumed_kimg"] for r in helpers.metrics(out)][-1] == pytest.approx(0.032)
    last = ckpt_lib.load_checkpoint(summary["checkpoint"])
    assert torch.equal(last.state["D"]["blocks.0.conv0.weight"], pkl[1]["D"]["blocks.0.conv0.weight"])
    with pytest.raises(ValueError, match="--freeze-d 1, but .* was trained with --freeze-d 2"):
        train(dataclasses.replace(s, kimg=0.08, freeze_d=1))


@pytest.mark.slow
def test_two_ray_train_workers_start_from_a_styleray_checkpoint(ray_local, source_run, tiny_data, tmp_path):
    out = tmp_path / "run"
    source = ckpt_lib.resolve(source_run)
    summary = train(settings(tiny_data, out, init_from=source_run, map=3, freeze_d=1, workers=2, kimg=0.032,
                             tick=0.016, snap=2, cpus_per_worker=0.9))
    ck = ckpt_lib.load_checkpoint(summary["checkpoint"])
    assert len(ck.meta["replicas"]) == 2 and len(set(ck.meta["replicas"])) == 1  # both ranks started alike
    assert torch.equal(ck.state["D"]["blocks.0.fromrgb.weight"], source.state["D"]["blocks.0.fromrgb.weight"])
    assert not torch.equal(ck.state["G"]["synthesis.blocks.0.const"], source.state["G"]["synthesis.blocks.0.const"])
    assert ModelConfig(**ck.state["model_cfg"]).mapping_layers == 3 and ck.kimg == pytest.approx(0.032)
