"""The styleray command: instant help, generate from a checkpoint, errors that exit 2 with a reason."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from styleray import cli
from styleray.config import resolve_preset
from styleray.models.training import StyleGAN2Trainer
from styleray.platform.checkpoint import save_checkpoint


def test_help_imports_neither_torch_nor_ray():
    code = (
        "import sys, contextlib, io\n"
        "import styleray.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: c.main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules, 'ray' in sys.modules, 'generate' in out.getvalue())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False", "True"]


def test_seed_ranges():
    assert cli._parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    for bad in ["a", "5-2", ""]:
        with pytest.raises(Exception, match="--seeds"):
            cli._parse_seeds(bad)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model, train = resolve_preset("cpu-tiny", resolution=16, train_overrides={"batch": 4})
    tr = StyleGAN2Trainer(model, train)
    tr.step(torch.rand(4, 3, 16, 16) * 2 - 1)
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(str(d), tr.state_dict(), config={}, meta={"cur_nimg": tr.cur_nimg, "kimg": tr.kimg, "tick": 1})
    return d


def test_generate_grid_folder_and_gif(run_dir, tmp_path, capsys):
    assert cli.main(["generate", "--checkpoint", str(run_dir), "--seeds", "0-5", "--cols", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (48, 32)
    assert cli.main(["generate", "--checkpoint", str(run_dir), "--seeds", "1,2", "--out", str(tmp_path / "imgs")]) == 0
    single = np.asarray(Image.open(tmp_path / "imgs" / "seed000002.png"))
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    np.testing.assert_array_equal(single, grid[:16, 32:48])  # seed 2 is the third cell of the grid
    assert cli.main(["generate", "--checkpoint", str(run_dir), "--seeds", "1,2", "--steps", "4", "--out", str(tmp_path / "m.gif")]) == 0
    assert Image.open(tmp_path / "m.gif").n_frames == 5
    assert "wrote" in capsys.readouterr().out


def test_generate_bad_checkpoint_exits_2_with_reason(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--checkpoint", "x", "--out", "y.png", "--bogus"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
