"""Typed configs and presets: the reference's auto formulas, and errors that name the flag and the fix."""

import pytest

from styleray.config import PRESETS, ModelConfig, RunSpec, TrainConfig, auto_batch, resolve_preset


@pytest.mark.parametrize(
    "res, workers, batch, mbstd, cbase, lr, gamma, ema",
    [
        (256, 1, 16, 4, 16384, 0.0025, 0.0002 * 256**2 / 16, 5.0),
        (256, 8, 64, 4, 16384, 0.0025, 0.2048, 20.0),
        (512, 8, 64, 4, 32768, 0.0025, 0.8192, 20.0),
        (1024, 8, 32, 4, 32768, 0.002, 6.5536, 10.0),
        (32, 1, 32, 4, 16384, 0.0025, 0.0064, 10.0),
        (64, 2, 64, 4, 16384, 0.0025, 0.0002 * 64**2 / 64, 20.0),
    ],
)
def test_auto_preset_matches_reference_formulas(res, workers, batch, mbstd, cbase, lr, gamma, ema):
    model, train = resolve_preset("auto", resolution=res, workers=workers)
    assert train.batch == batch == auto_batch(res, workers)
    assert model.mbstd_group == mbstd and model.channel_base == cbase and model.mapping_layers == 2
    assert train.lr_g == train.lr_d == lr
    assert train.r1_gamma == pytest.approx(gamma)
    assert train.ema_kimg == pytest.approx(ema) and train.ema_rampup == 0.05


def test_paper_presets():
    model, train = resolve_preset("paper256", resolution=256)
    assert (train.batch, model.mbstd_group, model.channel_base, train.r1_gamma, model.mapping_layers) == (64, 8, 16384, 1.0, 8)
    model, train = resolve_preset("stylegan2", resolution=1024)
    assert (train.batch, train.lr_g, train.r1_gamma, train.ema_kimg) == (32, 0.002, 10.0, 10.0)
    assert set(PRESETS) >= {"auto", "paper256", "paper512", "paper1024", "stylegan2", "cpu-tiny"}


def test_overrides_apply_last():
    model, train = resolve_preset("auto", resolution=64, train_overrides={"batch": 8, "r1_gamma": 3.0, "kimg": 1})
    assert train.batch == 8 and train.r1_gamma == 3.0 and train.kimg == 1
    assert model.mbstd_group == 4


def test_auto_with_an_explicit_batch_changes_only_the_batch():
    """The reference computes gamma, EMA and the mbstd group from auto's own batch (16 at 256 px on one GPU):
    --batch 12 gives gamma 0.0002 * 256^2 / 16 = 0.8192 and EMA 16 * 10 / 32 = 5 kimg, not 1.09 and 3.75."""
    model, train = resolve_preset("auto", resolution=256, train_overrides={"batch": 12})
    assert (train.batch, train.batch_gpu, train.rounds) == (12, 12, 1)
    assert train.r1_gamma == pytest.approx(0.8192) and train.ema_kimg == pytest.approx(5.0)
    assert model.mbstd_group == 4 and train.lr_g == 0.0025 and model.channel_base == 16384
    model, train = resolve_preset("auto", resolution=64, workers=2, train_overrides={"batch": 8})
    assert train.r1_gamma == pytest.approx(0.0002 * 64**2 / 64) and train.ema_kimg == pytest.approx(20.0)
    assert model.mbstd_group == 4 and train.batch_gpu == 4


@pytest.mark.parametrize(
    "preset, res, workers, overrides, batch, batch_gpu, rounds",
    [
        ("paper512", 512, 1, {}, 64, 8, 8),  # the reference's batch // ref_gpus: 8 rounds of 8 on one GPU
        ("paper512", 512, 8, {}, 64, 8, 1),
        ("paper256", 256, 2, {}, 64, 8, 4),
        ("paper1024", 1024, 1, {}, 32, 4, 8),
        ("stylegan2", 1024, 4, {}, 32, 4, 2),
        ("paper256", 256, 16, {}, 64, 4, 1),  # more workers than the preset's 8: their share, one round
        ("auto", 256, 1, {}, 16, 16, 1),
        ("auto", 256, 8, {}, 64, 8, 1),
        ("cpu-tiny", 32, 2, {}, 16, 8, 1),
        ("paper512", 512, 1, {"batch": 32}, 32, 32, 1),  # --batch: batch // workers, as the reference
        ("paper512", 512, 2, {"batch_gpu": 16}, 64, 16, 2),  # --batch-gpu wins
    ],
)
def test_batch_gpu_defaults_follow_the_reference(preset, res, workers, overrides, batch, batch_gpu, rounds):
    model, train = resolve_preset(preset, resolution=res, workers=workers, train_overrides=overrides)
    assert (train.batch, train.batch_gpu, train.rounds) == (batch, batch_gpu, rounds)
    assert train.round_batch * train.rounds * train.workers == train.batch
    assert train.round_batch % min(model.mbstd_group, train.round_batch) == 0


def test_run_config_json_roundtrip():
    model, train = resolve_preset("cpu-tiny", resolution=32)
    run = RunSpec(model, train, preset="cpu-tiny", data="d", out="o")
    import json

    assert RunSpec.from_dict(json.loads(run.to_json())) == run


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ModelConfig(resolution=100), r"--resolution 100 must be a power of two >= 4 \(try 64 or 128\)"),
        (lambda: ModelConfig(resolution=2), r"--resolution 2 must be a power of two"),
        (lambda: TrainConfig(batch=60, workers=8), r"--batch 60 must be a multiple of --workers 8 \(try --batch 64\)"),
        (lambda: resolve_preset("huge", resolution=64), r"--preset 'huge' is unknown; choose one of: auto"),
        (lambda: resolve_preset("auto", resolution=64, workers=0), r"--workers 0 must be >= 1"),
        (lambda: resolve_preset("auto", resolution=64, train_overrides={"batch": 6}), r"divisible by the minibatch std group"),
        (lambda: TrainConfig(augment_p=1.5), r"--augment-p 1.5 must lie in \[0, 1\]"),
        (lambda: TrainConfig(batch=64, workers=2, batch_gpu=12),
         r"--batch 64 must be a multiple of --workers 2 x --batch-gpu 12 = 24 .*try --batch 72 or --batch-gpu 8"),
        (lambda: TrainConfig(batch=8, batch_gpu=0), r"--batch-gpu 0 must be >= 1"),
        (lambda: resolve_preset("auto", resolution=256, train_overrides={"batch": 12, "batch_gpu": 6}),
         r"a round of 6 images per worker .* minibatch std group 4 .* make --batch-gpu a multiple of 4"),
        (lambda: TrainConfig(augment_pipe="bgx"), r"--augpipe 'bgx' must be one of blit, geom, color"),
        (lambda: TrainConfig(ada_target=1.0), r"--target 1.0 must lie in \(0, 1\)"),
    ],
)
def test_bad_values_name_the_flag_and_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()
