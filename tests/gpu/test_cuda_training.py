"""The training step on CUDA: every phase's gradients finite and equal to the CPU's; each reduced precision
trains with finite losses; a checkpoint written on CUDA loads on the CPU and the other way; an exact resume.

The CPU comparison needs the same random numbers on both devices: the phases run with fixed latents, no style
mixing and no augmentation, and the draws left (synthesis noise, the path-length probe) come from one CPU
generator and are moved to the device (``same_draws``). Tolerance: 1e-3 relative to the largest gradient of the
module (fp32 without TF32; convolution algorithms sum in another order)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from gpu_helpers import GPU

from styleray.config import RunSpec, resolve_preset
from styleray.models.phases import Round
from styleray.models.sampling import seeds_to_z
from styleray.models.training import StyleGAN2Trainer
from styleray.platform import checkpoint as ckpt_lib

pytestmark = GPU


def _configs(**train):
    return resolve_preset("cpu-tiny", resolution=32, train_overrides={"batch": 8, **train})


@contextlib.contextmanager
def same_draws(seed: int):
    """torch.randn / randn_like draw from one CPU generator, then move to the asked device."""
    g = torch.Generator().manual_seed(seed)
    randn, randn_like = torch.randn, torch.randn_like

    def cpu_randn(*size, device=None, dtype=None, generator=None, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)) else size
        return randn(*shape, generator=g, dtype=dtype or torch.float32).to(device or "cpu")

    def cpu_randn_like(x, **kw):
        return randn(x.shape, generator=g, dtype=x.dtype).to(x.device)

    torch.randn, torch.randn_like = cpu_randn, cpu_randn_like
    try:
        yield
    finally:
        torch.randn, torch.randn_like = randn, randn_like


def _phase_grads(device: str, phase_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    model, cfg = _configs(style_mixing=0.0, augment="noaug", precision="fp32")
    trainer = StyleGAN2Trainer(model, cfg, device)
    g = torch.Generator().manual_seed(1)
    real = (torch.rand(8, 3, 32, 32, generator=g) * 2 - 1).to(device)
    z = torch.randn(8, model.z_dim, generator=g).to(device)
    phase = trainer.phases[phase_index]
    module = trainer.G if phase.trains_generator else trainer.D
    module.zero_grad(set_to_none=True)
    with same_draws(2):
        stats = phase.accumulate(trainer, Round(real, None, z, None), gain=phase.interval)
    grads = {n: p.grad.detach().cpu() for n, p in module.named_parameters() if p.grad is not None}
    return grads, {k: float(v) for k, v in stats.items()}


@pytest.mark.parametrize("phase_index,name", [(0, "Gmain"), (1, "Greg"), (2, "Dmain"), (3, "Dreg")])
def test_every_phase_on_cuda_has_finite_gradients_that_match_the_cpu(phase_index, name):
    cuda, cuda_stats = _phase_grads("cuda", phase_index)
    cpu, cpu_stats = _phase_grads("cpu", phase_index)
    assert cuda.keys() == cpu.keys() and cuda, name
    scale = max(float(g.abs().max()) for g in cpu.values())
    assert scale > 0, f"{name}: no gradient at all"
    for key, g in cuda.items():
        assert torch.isfinite(g).all(), f"{name}: {key} has non-finite gradients on CUDA"
        assert float((g - cpu[key]).abs().max()) <= 1e-3 * scale, f"{name}: {key}"
    for key, value in cpu_stats.items():
        assert cuda_stats[key] == pytest.approx(value, rel=1e-3, abs=1e-5), f"{name}: {key}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_each_reduced_precision_trains_with_finite_losses(precision):
    model, cfg = _configs(precision=precision)
    trainer = StyleGAN2Trainer(model, cfg, "cuda")
    assert trainer.precision.name == precision and trainer.G.cfg.mixed_precision == precision
    real = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    for _ in range(17):  # every phase, R1 included, at least once
        stats = trainer.step(real)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in stats.values()), stats
    assert all(torch.isfinite(p).all() for p in trainer.G.parameters())


def _ema_images(trainer, seeds=(0, 1, 2)) -> torch.Tensor:
    z = seeds_to_z(seeds, trainer.model_cfg.z_dim, trainer.device)
    with torch.no_grad():
        return trainer.G_ema(z, noise_mode="const").cpu()


@pytest.mark.parametrize("source,target", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_written_on_one_device_loads_on_the_other(tmp_path, source, target):
    model, cfg = _configs(precision="fp32")
    trainer = StyleGAN2Trainer(model, cfg, source)
    real = torch.rand(8, 3, 32, 32, device=source) * 2 - 1
    for _ in range(2):
        trainer.step(real)
    uri = ckpt_lib.save_checkpoint(str(tmp_path), trainer.state_dict(), config=RunSpec(model, cfg).to_dict(),
                                   meta={"cur_nimg": trainer.cur_nimg, "kimg": trainer.kimg, "tick": 1})
    loaded = StyleGAN2Trainer(model, cfg, target)
    loaded.load_state_dict(ckpt_lib.load_checkpoint(uri, map_location=target).state)
    assert loaded.cur_nimg == trainer.cur_nimg
    assert float((_ema_images(loaded) - _ema_images(trainer)).abs().max()) < 1e-3
    loaded.step(real.to(target))  # the optimizer state moved too: training goes on


def test_resume_on_cuda_is_exact():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    model, cfg = _configs(precision="auto")
    real = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    a = StyleGAN2Trainer(model, cfg, "cuda")
    for _ in range(3):
        a.step(real)
    state = copy.deepcopy(a.state_dict())  # a state_dict shares the live tensors
    for _ in range(3):
        a.step(real)
    b = StyleGAN2Trainer(model, cfg, "cuda")
    b.load_state_dict(state)
    for _ in range(3):
        b.step(real)
    for (name, pa), pb in zip(a.G.named_parameters(), b.G.parameters()):
        assert torch.equal(pa, pb), f"G.{name} differs after resuming on CUDA"
    assert a.augment_pipe is None or torch.equal(a.augment_pipe.p, b.augment_pipe.p)
    assert a.cur_nimg == b.cur_nimg
