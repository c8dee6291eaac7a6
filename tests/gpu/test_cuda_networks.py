"""G and D on CUDA: the same outputs as on the CPU in fp32, and each reduced precision close to fp32.

Tolerances: fp32 CUDA vs CPU within 1e-3 of outputs of order 1 (different convolution algorithms sum in another
order); bf16 within 0.15 and fp16 within 0.05 of fp32, relative to the output's scale (bf16 keeps 8 bits of
mantissa, fp16 11; the top two resolutions run reduced, the rest and the epilogue fp32)."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import GPU, small_model

from styleray.models.networks import Discriminator, Generator

pytestmark = GPU


def _pair(cls, cfg):
    torch.manual_seed(0)
    cpu = cls(cfg).eval()
    cuda = cls(cfg).eval().cuda()
    cuda.load_state_dict(cpu.state_dict())
    return cpu, cuda


def _inputs(cfg, n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, cfg.z_dim, generator=g), torch.rand(n, 3, cfg.resolution, cfg.resolution, generator=g) * 2 - 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@torch.no_grad()
def test_generator_and_discriminator_on_cuda_match_the_cpu_in_fp32():
    cfg = small_model()
    z, img = _inputs(cfg)
    g_cpu, g_cuda = _pair(Generator, cfg)
    d_cpu, d_cuda = _pair(Discriminator, cfg)
    out_cpu, out_cuda = g_cpu(z, noise_mode="const"), g_cuda(z.cuda(), noise_mode="const")
    assert out_cuda.dtype == torch.float32 and torch.isfinite(out_cuda).all()
    assert (out_cpu - out_cuda.cpu()).abs().max() < 1e-3
    assert (d_cpu(img, None) - d_cuda(img.cuda(), None).cpu()).abs().max() < 1e-3


@pytest.mark.parametrize("precision,tolerance", [("bf16", 0.15), ("fp16", 0.05)])
@torch.no_grad()
def test_each_reduced_precision_stays_close_to_fp32(precision, tolerance):
    z, img = _inputs(small_model())
    torch.manual_seed(0)
    g32, d32 = Generator(small_model()).eval().cuda(), Discriminator(small_model()).eval().cuda()
    g, d = Generator(small_model(precision=precision)).eval().cuda(), Discriminator(small_model(precision=precision)).eval().cuda()
    g.load_state_dict(g32.state_dict())
    d.load_state_dict(d32.state_dict())
    ref_img, low_img = g32(z.cuda(), noise_mode="const"), g(z.cuda(), noise_mode="const")
    assert low_img.dtype == torch.float32 and torch.isfinite(low_img).all()  # the image leaves G in fp32
    assert 0 < _rel(low_img, ref_img) < tolerance  # > 0: the reduced layers did run reduced
    assert _rel(d(img.cuda(), None), d32(img.cuda(), None)) < tolerance
