"""TrainSettings: one set of rules for flags, YAML files, sweep hyperparameters and queue requests."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from styleray import cli
from styleray.platform.manager.requests import check_request
from styleray.settings import (
    SettingsError,
    TrainSettings,
    add_arguments,
    field_names,
    from_argv,
    from_command_line,
    load_file,
)

RICH = dict(data="s3://b/data", out="/runs/r", preset="cpu-tiny", kimg=2.5, batch=8, lr_g=0.004, gamma=0.5,
            mirror=True, cond=True, workers=2, cpus_per_worker=0.45, metrics=("fid", "kid"), metrics_every=3,
            resume="none", target=0.7, seed=3)


def _train(argv: list[str]) -> TrainSettings:
    args = cli.build_parser().parse_args(["train", *argv])
    return from_command_line(args, args.config)


def test_flags_and_files_give_the_same_settings(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train:\n  data: d\n  preset: cpu-tiny\n  lr-g: 0.004\n  batch: 16\n  mirror: true\n"
                   "  gpus: false\n  metrics: [fid, kid]\n")
    s = _train(["--config", str(cfg), "--out", "o", "--batch", "8"])  # the flag wins over the file
    assert (s.data, s.preset, s.lr_g, s.batch, s.mirror, s.gpus, s.metrics) == \
        ("d", "cpu-tiny", 0.004, 8, True, False, ("fid", "kid"))
    assert s == _train(["--data", "d", "--out", "o", "--preset", "cpu-tiny", "--lr-g", "0.004", "--batch", "8",
                        "--mirror", "--metrics", "fid,kid"])
    run = s.resolve(16, 3, 0)
    assert run.train.lr_g == 0.004 and run.train.lr_d == 0.0025 and run.train.batch == 8 and run.train.mirror


def test_a_queue_request_file_is_a_train_settings_file(tmp_path, tiny_data):
    """One schema: the same file trains with `train --config` and queues with `queue add --config`."""
    path = tmp_path / "request.yaml"
    path.write_text(f"name: heroes\npriority: 4\ntrain:\n  data: {tiny_data}\n  out: {tmp_path / 'run'}\n"
                    "  preset: cpu-tiny\n  batch: 4\n  kimg: 0.5\n  mirror: true\n")
    trained = _train(["--config", str(path)])
    fields, mapping = load_file(str(path))
    spec = check_request(fields["name"], mapping, priority=fields["priority"])
    assert spec.error is None and TrainSettings.from_mapping(spec.settings) == trained
    assert spec.config == trained.resolve(16, 3, 2).to_dict()


@pytest.mark.parametrize("mapping, message", [
    ({"lr_q": 0.1}, "unknown key 'lr_q': not a train setting (known: allow_tf32, aug,"),
    ({"mirror": 1}, "mirror (--mirror) = 1: a switch: write true or false"),
    ({"batch": "many"}, "batch (--batch) = 'many': expected a whole number"),
    ({"batch": 2.5}, "batch (--batch) = 2.5: expected a whole number"),
    ({"batch": 0}, "batch (--batch) = 0: must be >= 1"),
    ({"kimg": float("nan")}, "kimg (--kimg) = nan: expected a finite number"),
    ({"target": 1.0}, "target (--target) = 1.0: must be in (0, 1)"),
    ({"resolution": 24}, "resolution (--resolution) = 24: must be a power of two >= 4"),
    ({"preset": "huge"}, "preset (--preset) = 'huge': choose one of auto, stylegan2"),
    ({"metrics": []}, "metrics (--metrics) = []: the list is empty"),
    ({"workers": None}, "workers (--workers) = None: give a value (default 1)"),
    ({"no_ray": True, "workers": 2}, "no_ray (--no-ray) trains in this process: use --workers 1"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(mapping, message):
    with pytest.raises(SettingsError) as e:
        TrainSettings.from_mapping({"data": "d", "out": "o", **mapping}, "--config x.yaml")
    assert message in str(e.value) and str(e.value).startswith("--config x.yaml: ")
    assert isinstance(e.value, ValueError)  # never SystemExit below the CLI


def test_required_settings_are_named():
    with pytest.raises(SettingsError, match="out is required \\(--out, or in a --config file\\)"):
        TrainSettings.from_mapping({"data": "d"})
    with pytest.raises(SettingsError, match="data and out are required"):
        TrainSettings.from_mapping({})


def test_replace_checks_every_value_again():
    """A sweep's trial is dataclasses.replace(base, **hyperparameters): the same rules apply."""
    base = TrainSettings(data="d", out="o")
    trial = dataclasses.replace(base, lr_g=0.002, batch=16, mirror=True)
    assert (trial.lr_g, trial.batch, trial.mirror) == (0.002, 16, True)
    with pytest.raises(SettingsError, match="lr_g \\(--lr-g\\) = -0.1: must be > 0"):
        dataclasses.replace(base, lr_g=-0.1)
    assert dataclasses.replace(base, kimg="3").kimg == 3.0  # text is converted as the flag's would be


def test_argv_json_and_changed_rebuild_the_same_settings():
    s = TrainSettings(**RICH)
    assert from_argv(s.to_argv()) == s
    assert TrainSettings.from_json(s.to_json()) == s
    assert TrainSettings.from_mapping(json.loads(json.dumps(s.changed()))) == s
    assert s.changed() == {**RICH, "metrics": ["fid", "kid"]}  # exactly what differs from the defaults
    portable = s.changed(portable_only=True)
    assert "out" not in portable and "resume" not in portable and "cpus_per_worker" not in portable
    assert portable["lr_g"] == 0.004 and portable["data"] == "s3://b/data"
    assert TrainSettings(data="d", out="o").to_argv() == ["--data", "d", "--out", "o"]
    assert TrainSettings(data="d", out="o").to_argv(include=("resume",))[-2:] == ["--resume", "latest"]


def test_the_parser_is_built_from_the_fields():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest: a for a in parser._actions if a.dest in field_names()}
    assert set(flags) == field_names()  # one flag per field, nothing else to keep in step
    assert "(default: 1000)" in flags["metrics_num_gen"].help and "(required" in flags["data"].help
    assert flags["preset"].choices == ("auto", "stylegan2", "paper256", "paper512", "paper1024", "cpu-tiny")
    ns = parser.parse_args(["--kimg", "3"])
    assert vars(ns) == {"kimg": 3.0}  # flags not given stay out: a file's values can sit under them


def test_bad_flags_exit_2_with_the_flag_and_the_value(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "d", "--out", "o", "--lr-g", "-1"])
    assert e.value.code == 2 and "argument --lr-g: '-1': must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("data: d\nlr_q: 0.1\n", "unknown key 'lr_q': not a train setting"),
    ("data: d\nmirror: 1\n", "mirror (--mirror) = 1: a switch: write true or false"),
    ("- a\n- b\n", "expected a mapping of train settings"),
    ("data: d\nbatch: many\n", "batch (--batch) = 'many': expected a whole number"),
    ("name: x\ntrain: {data: d}\nextra: 1\n", "unknown key(s) extra beside `train:`"),
    ("data: [d\n", "is not valid YAML"),
])
def test_config_file_errors_are_clear(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", str(cfg), "--out", "o"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(tmp_path / "none.yaml"), "--out", "o"])
    assert "--config " + str(tmp_path / "none.yaml") + ": No such file" in capsys.readouterr().err


def test_the_reference_options_reach_the_run_from_every_route(tmp_path, tiny_data):
    """--batch-gpu, --augpipe and --allow-tf32 from flags, a YAML file, a queued request and a sweep's trial."""
    out = tmp_path / "run"
    s = _train(["--data", str(tiny_data), "--out", str(out), "--preset", "cpu-tiny", "--batch", "8",
                "--batch-gpu", "4", "--augpipe", "bgcfnc", "--allow-tf32"])
    path = tmp_path / "train.yaml"
    path.write_text(f"train:\n  data: {tiny_data}\n  out: {out}\n  preset: cpu-tiny\n  batch: 8\n  batch-gpu: 4\n"
                    "  augpipe: bgcfnc\n  allow_tf32: true\n")
    assert _train(["--config", str(path)]) == s and from_argv(s.to_argv()) == s
    train = s.resolve(16, 3, 0).train
    assert (train.batch_gpu, train.rounds, train.augment_pipe, train.allow_tf32) == (4, 2, "bgcfnc", True)
    request = check_request("r", s.changed())
    assert request.error is None and request.config["train"]["batch_gpu"] == 4
    assert request.config["train"]["augment_pipe"] == "bgcfnc" and request.config["train"]["allow_tf32"] is True
    trial = dataclasses.replace(s, batch_gpu=2, augpipe="bg", allow_tf32=False).resolve(16, 3, 0).train
    assert (trial.batch_gpu, trial.rounds, trial.augment_pipe, trial.allow_tf32) == (2, 4, "bg", False)


def test_the_reference_options_default_to_the_reference_and_reject_what_cannot_work():
    defaults = TrainSettings(data="d", out="o", preset="paper512").resolve(512, 3, 0).train
    assert (defaults.batch_gpu, defaults.rounds, defaults.augment_pipe, defaults.allow_tf32) == (8, 8, "bgc", False)
    with pytest.raises(ValueError, match=r"--batch 12 must be a multiple of --workers 2 x --batch-gpu 4 = 8 .* try "
                                         r"--batch 16 or --batch-gpu 3"):
        TrainSettings(data="d", out="o", batch=12, workers=2, batch_gpu=4).resolve(64, 3, 0)
    with pytest.raises(SettingsError, match="augpipe \\(--augpipe\\) = 'bgx': choose one of blit, geom, color"):
        TrainSettings(data="d", out="o", augpipe="bgx")
    with pytest.raises(SettingsError, match="batch_gpu \\(--batch-gpu\\) = 0: must be >= 1"):
        TrainSettings(data="d", out="o", batch_gpu=0)


def test_precision_reaches_the_run_from_every_route_and_cpu_workers_refuse_reduced_precision(tmp_path, tiny_data):
    s = _train(["--data", str(tiny_data), "--out", str(tmp_path / "run"), "--gpus", "--precision", "fp16", "--compile"])
    train = s.resolve(16, 3, 0).train
    assert (train.precision, train.compile) == ("fp16", True) and from_argv(s.to_argv()) == s
    assert check_request("r", s.changed()).config["train"]["precision"] == "fp16"
    assert TrainSettings(data="d", out="o").resolve(16, 3, 0).train.precision == "auto"
    assert TrainSettings(data="d", out="o", no_ray=True, precision="bf16").precision == "bf16"  # device decided later
    for kw, where in (({}, "CPU workers \\(no --gpus\\)"), ({"no_ray": True, "device": "cpu"}, "--device cpu")):
        with pytest.raises(SettingsError, match=f"--precision bf16\\) needs CUDA GPUs but this run trains on {where}"):
            TrainSettings(data="d", out="o", precision="bf16", **kw)
    with pytest.raises(SettingsError, match="precision \\(--precision\\) = 'tf32': choose one of auto, fp32, bf16"):
        TrainSettings(data="d", out="o", precision="tf32")
