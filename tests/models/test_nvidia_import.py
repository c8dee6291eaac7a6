"""NVIDIA network pickles read without NVIDIA's code: the same images, every tensor accounted for, nothing in
the file run, and a named refusal for everything else (tests/nvidia_fixture.py writes the pickles)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import nvidia_fixture as nf
from styleray.config import ModelConfig
from styleray.models.interop.nvidia_networks import convert_networks
from styleray.models.interop.nvidia_pickle import NetworkPickleError, read_network_pickle
from styleray.models.networks import Discriminator, Generator


def tiny(**kw) -> ModelConfig:
    base = dict(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16, mbstd_group=2)
    return ModelConfig(**{**base, **kw})


def convert(data: bytes, source: str = "snap.pkl"):
    return convert_networks(read_network_pickle(data, source), source)


@pytest.mark.parametrize("cfg", [
    tiny(),
    tiny(c_dim=3, resolution=32, mapping_layers=8, num_fp16_res=0, conv_clamp=None, mbstd_group=4, z_dim=24),
], ids=["uncond16", "cond32"])
def test_same_latent_gives_the_same_image_as_the_original(cfg):
    G, D, G_ema = nf.random_networks(cfg)
    imported = convert(nf.dump(nf.snapshot(G, D, G_ema, augment_p=0.375)))
    assert imported.model == cfg
    z = torch.randn(4, cfg.z_dim)
    c = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float() if cfg.c_dim else None
    for name, original in (("G", G), ("G_ema", G_ema)):
        ours = Generator(imported.model).eval()
        ours.load_state_dict(imported.states[name])
        for psi in (1.0, 0.6):
            assert torch.equal(ours(z, c, truncation_psi=psi, noise_mode="const"),
                               original.eval()(z, c, truncation_psi=psi, noise_mode="const"))
    ours_D = Discriminator(imported.model)
    ours_D.load_state_dict(imported.states["D"])
    img = torch.randn(4, 3, cfg.resolution, cfg.resolution)
    assert torch.equal(ours_D(img, c), D(img, c))
    assert imported.augment_p == 0.375
    assert imported.training_set["path"] == "/data/heroes.zip" and imported.training_set["xflip"] is True
    assert imported.parameters == {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())}


def test_a_freeze_d_snapshot_keeps_its_frozen_layers_as_buffers_and_still_maps():
    cfg = tiny()
    G, D, G_ema = nf.random_networks(cfg)
    imported = convert(nf.dump(nf.snapshot(G, D, G_ema, freeze=5)))
    assert all(torch.equal(imported.states["D"][k], v) for k, v in D.state_dict().items())


def test_the_stored_module_source_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    snap = nf.snapshot(*nf.random_networks(tiny()), marker=str(marker))
    exec(compile(snap["G"].module_src, "module_src", "exec"), {})  # the fixture's source does leave a marker ...
    assert marker.exists()
    marker.unlink()
    convert(nf.dump(snap))
    assert not marker.exists()  # ... and the importer never ran it


def test_an_os_system_reduce_is_refused_by_name_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    snap = nf.snapshot(*nf.random_networks(tiny()))
    snap["G"].state["evil"] = Evil()
    with pytest.raises(NetworkPickleError, match=r"snap.pkl: refused: .*(posix|os)\.system"):
        convert(nf.dump(snap))
    assert not marker.exists()


@pytest.mark.parametrize("payload, name", [
    ((eval, ("1 + 1",)), "builtins.eval"),
    ((getattr, ("text", "upper")), "builtins.getattr"),
    ((torch.nn.Linear, (2, 2)), "torch.nn.modules.linear.Linear"),
])
def test_any_other_global_is_refused_with_its_name(payload, name):
    class Other:
        def __reduce__(self):
            return payload

    with pytest.raises(NetworkPickleError, match=f"refused: the pickle asks for {name}"):
        read_network_pickle(pickle.dumps({"G": Other()}, protocol=4), "x.pkl")


def test_tensorflow_pickles_are_named_and_the_conversion_step_given():
    with pytest.raises(NetworkPickleError, match=r"TensorFlow-era pickle .*dnnlib\.tflib\.network\.Network.*legacy\.py"):
        read_network_pickle(nf.tf_era_pickle(), "ffhq-tf.pkl")


def test_a_stylegan3_generator_is_named_as_unsupported():
    snap = nf.snapshot(*nf.random_networks(tiny()))
    synthesis = snap["G_ema"].child("synthesis")
    synthesis.state["_modules"] = {"input": nf.Persistent("SynthesisInput", nf.module_state()),
                                   **synthesis.state["_modules"]}
    with pytest.raises(NetworkPickleError, match="G_ema is a StyleGAN3 .* not supported"):
        convert(nf.dump(snap))


def test_other_architectures_are_named():
    snap = nf.snapshot(*nf.random_networks(tiny()))
    snap["D"].state["_init_kwargs"]["architecture"] = "orig"
    with pytest.raises(NetworkPickleError, match="D was built with architecture='orig'.*resnet"):
        convert(nf.dump(snap))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("G_ema"), "has no G_ema network"),
    (lambda s: s["G"].child("synthesis.b8.conv0").state["_parameters"].update(extra=torch.zeros(2)),
     r"G.synthesis.b8.conv0.extra has no counterpart"),
    (lambda s: s["D"].child("b4.fc").state["_parameters"].update(bias=torch.zeros(3)),
     r"D.b4.fc.bias has shape \[3\], styleray's b4.fc.bias \[16\]"),
    (lambda s: s["G_ema"].child("mapping").state["_buffers"].pop("w_avg"), r"G_ema lacks 1 tensor.*mapping.w_avg"),
    (lambda s: s["D"].child("b16.conv1").state["_buffers"].update(resample_filter=torch.ones(4, 4)),
     r"D.b16.conv1.resample_filter is not the \[1, 3, 3, 1\] low-pass filter"),
])
def test_every_tensor_is_accounted_for(edit, message):
    snap = nf.snapshot(*nf.random_networks(tiny()))
    edit(snap)
    with pytest.raises(NetworkPickleError, match=message):
        convert(nf.dump(snap))


def test_bad_files_are_one_line_errors():
    data = nf.dump(nf.snapshot(*nf.random_networks(tiny())))
    with pytest.raises(NetworkPickleError, match="x.pkl: truncated or corrupt pickle"):
        read_network_pickle(data[: len(data) // 2], "x.pkl")
    with pytest.raises(NetworkPickleError, match="is not a pickle"):
        read_network_pickle(b"\x89PNG\r\n\x1a\n" + bytes(100), "x.png")
    with pytest.raises(NetworkPickleError, match="zip archive"):
        read_network_pickle(b"PK\x03\x04" + bytes(100), "ckpt.pt")
    with pytest.raises(NetworkPickleError, match="is empty"):
        read_network_pickle(b"", "empty.pkl")
    with pytest.raises(NetworkPickleError, match="holds a list, not the dict of networks"):
        convert(pickle.dumps([1, 2]))


def test_a_tensor_reaching_past_its_storage_is_refused():
    class Bad:
        def __reduce__(self):
            t = torch.zeros(4)
            rebuild, args = t.__reduce_ex__(4)
            return rebuild, (args[0], 2, (4,), (1,), *args[4:])  # offset 2 + 4 elements > 4

    with pytest.raises(NetworkPickleError, match="reaches past its storage"):
        read_network_pickle(pickle.dumps(Bad(), protocol=4))


def test_numpy_values_are_read_as_numbers_and_arrays():
    import numpy as np

    data = pickle.dumps({"gain": np.float64(0.5), "bands": np.arange(6, dtype=np.int32).reshape(2, 3),
                         "flags": np.array([True, False])}, protocol=4)
    content = read_network_pickle(data)
    assert content["gain"] == 0.5 and content["bands"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert content["flags"].dtype == np.bool_
    with pytest.raises(NetworkPickleError, match="not numeric"):
        read_network_pickle(pickle.dumps(np.array([object()], dtype=object), protocol=4))
