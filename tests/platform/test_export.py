"""`styleray export`: the generator as ONNX, run by a real onnxruntime session at any batch size and compared with
PyTorch; bad paths are one-line errors that write nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from styleray import cli
from styleray.config import resolve_preset
from styleray.models import sampling
from styleray.models.interop.onnx_export import ExportCheckFailed, check_with_onnxruntime
from styleray.models.training import StyleGAN2Trainer
from styleray.platform.checkpoint import load_generator, save_checkpoint
from styleray.platform.export import export_onnx


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A conditional cpu-tiny checkpoint after one step (w_avg moved, so truncation does something)."""
    model, train = resolve_preset("cpu-tiny", resolution=16, c_dim=2, train_overrides={"batch": 4})
    tr = StyleGAN2Trainer(model, train)
    tr.step(torch.rand(4, 3, 16, 16) * 2 - 1, torch.eye(2)[[0, 1, 0, 1]])
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(str(d), tr.state_dict(), config={}, meta={"cur_nimg": tr.cur_nimg, "kimg": tr.kimg, "tick": 1})
    return str(d)


@pytest.mark.slow
def test_the_onnx_generator_matches_pytorch_at_any_batch_size(run_dir, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "G.onnx"
    assert cli.main(["export", "--checkpoint", run_dir, "--onnx", str(out)]) == 0
    assert "opset 18" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["z", "psi", "c"]
    assert session.get_inputs()[0].shape[0] == session.get_outputs()[0].shape[0] == "batch"

    G, _ = load_generator(run_dir)
    seeds = [3, 1, 4, 1, 5]  # a batch size the export's own check did not run
    z = sampling.seeds_to_z(seeds, G.z_dim).numpy()
    for psi, cls in ((1.0, 0), (0.6, 1)):
        c = np.eye(2, dtype=np.float32)[[cls] * len(seeds)]
        (img,) = session.run(["img"], {"z": z, "psi": np.array(psi, np.float32), "c": c})
        ours = sampling.generate_images(G, seeds, truncation_psi=psi, class_idx=cls)  # uint8 [N, H, W, C]
        theirs = sampling.to_uint8(torch.from_numpy(img))
        assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1  # rounding of values within 1e-3
    assert not np.array_equal(*[session.run(["img"], {"z": z, "psi": np.array(p, np.float32), "c": c})[0]
                                for p in (1.0, 0.5)])  # psi is a real input

    # The check catches a wrong model: the same graph with one weight tensor shifted (not scaled: demodulation
    # would undo a scale).
    broken = onnx.load(str(out))
    init = max(broken.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(init) + 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), init.name))
    with pytest.raises(ExportCheckFailed, match="differ from PyTorch's by up to"):
        check_with_onnxruntime(G, broken.SerializeToString())


def test_unwritable_targets_are_refused_before_any_work(run_dir, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a folder")
    for target, message in ((tmp_path / "file.txt" / "G.onnx", "is not a folder this process may write in"),
                            (tmp_path, "is a folder: give a file name")):
        with pytest.raises(SystemExit) as e:
            cli.main(["export", "--checkpoint", run_dir, "--onnx", str(target)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_a_missing_checkpoint_or_bad_tolerance_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        export_onnx(str(tmp_path), str(tmp_path / "G.onnx"))
    with pytest.raises(ValueError, match="--tolerance 0 must be > 0"):
        export_onnx(str(tmp_path), str(tmp_path / "G.onnx"), tolerance=0)
    assert not (tmp_path / "G.onnx").exists()


def test_help_states_the_opset_and_the_dynamic_batch(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "opset 18" in text and "batch axis is dynamic" in text and "onnxruntime" in text
