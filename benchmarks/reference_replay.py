"""One training iteration of NVIDIA's stylegan2-ada-pytorch, replayed from a checkout outside the project.

Used by ``train_step.py --reference-checkout PATH``. Nothing of NVIDIA's code is in this repository: this module
imports the checkout's own ``training.networks``, ``training.augment`` and ``training.loss`` at run time and
drives them the way the reference's training loop does (written from reading ``training/training_loop.py``):

    latents for every phase drawn up front; for each due phase (Gmain, Greg every 4, Dmain, Dreg every 16):
        zero the module's grads, module.requires_grad_(True), loss.accumulate_gradients(phase, ..., gain=interval),
        requires_grad_(False), non-finite grads scrubbed, Adam step (lazy-regularisation corrected lr and betas)
    G_ema update (ema_kimg = batch * 10 / 32, ramp-up 0.05)

Configuration: the reference's ``--cfg auto`` at the given resolution and batch (channel_base 16384 below 512 px,
32768 at 512, channel_max 512, mapping 2 layers, minibatch-std group min(batch, 4), gamma 0.0002 res^2 / batch,
lr 0.0025), ``--augpipe bgc`` at a fixed p, one round per phase (``--batch-gpu`` = batch, one process).
``fp16_res`` is the reference's ``num_fp16_res``: its ``--fp32`` (0) is the default here, since styleray trains in
fp32 on a CPU too; 4 is the reference's default, built for CUDA.

The object quacks like a StyleGAN2Trainer for the benchmark: ``batch_idx``, ``step(real)``, ``phases`` (each with
``name`` and ``accumulate``) and ``_update_ema``, so the benchmark times and splits it the same way.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

AUGMENT_BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1, contrast=1,
                   lumaflip=1, hue=1, saturation=1)


def import_checkout(path: str):
    """The checkout's (dnnlib, networks, AugmentPipe, StyleGAN2Loss); a clear error when PATH is not one."""
    marker = os.path.join(path, "training", "loss.py")
    if not os.path.isfile(marker):
        raise SystemExit(f"--reference-checkout {path}: no training/loss.py there; give a checkout of "
                         "NVlabs/stylegan2-ada-pytorch (git clone it outside the project)")
    if path not in sys.path:
        sys.path.insert(0, path)
    import dnnlib  # noqa: E402  (the checkout's)
    from training import networks  # noqa: E402
    from training.augment import AugmentPipe  # noqa: E402
    from training.loss import StyleGAN2Loss  # noqa: E402

    return dnnlib, networks, AugmentPipe, StyleGAN2Loss


class _Phase:
    """One of the reference loop's phases; ``accumulate`` is what the benchmark's phase clock wraps."""

    def __init__(self, name: str, module: torch.nn.Module, opt: torch.optim.Optimizer, interval: int, loss):
        self.name, self.module, self.opt, self.interval, self.loss = name, module, opt, interval, loss

    def accumulate(self, real: torch.Tensor, c: torch.Tensor, z: torch.Tensor, gen_c: torch.Tensor) -> None:
        self.loss.accumulate_gradients(phase=self.name, real_img=real, real_c=c, gen_z=z, gen_c=gen_c, sync=True,
                                       gain=self.interval)


class ReferenceReplay:
    """NVIDIA's networks, augment pipe and loss, stepped as its training loop steps them (no data loader)."""

    def __init__(self, checkout: str, res: int, batch: int, augment_p: float, device: str = "cpu",
                 fp16_res: int = 0, seed: int = 0):
        dnnlib, networks, AugmentPipe, StyleGAN2Loss = import_checkout(checkout)
        self.device, self.batch = torch.device(device), batch
        torch.manual_seed(seed)
        channels = dict(channel_base=32768 if res >= 512 else 16384, channel_max=512, num_fp16_res=fp16_res,
                        conv_clamp=256 if fp16_res > 0 else None)
        self.G = networks.Generator(
            z_dim=512, c_dim=0, w_dim=512, img_resolution=res, img_channels=3,
            mapping_kwargs=dnnlib.EasyDict(num_layers=2), synthesis_kwargs=dnnlib.EasyDict(**channels),
        ).train().requires_grad_(False).to(self.device)
        self.D = networks.Discriminator(
            c_dim=0, img_resolution=res, img_channels=3, **channels,
            epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=min(batch, 4)),
        ).train().requires_grad_(False).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval()
        self.augment_pipe = AugmentPipe(**AUGMENT_BGC).train().requires_grad_(False).to(self.device)
        self.augment_pipe.p.copy_(torch.as_tensor(augment_p))
        loss = StyleGAN2Loss(self.device, self.G.mapping, self.G.synthesis, self.D, augment_pipe=self.augment_pipe,
                             r1_gamma=0.0002 * res**2 / batch)
        self.phases = []
        for name, module, interval in (("G", self.G, 4), ("D", self.D, 16)):
            ratio = interval / (interval + 1)  # lazy regularisation (the reference's mb_ratio)
            opt = torch.optim.Adam(module.parameters(), lr=0.0025 * ratio, betas=(0.0, 0.99**ratio), eps=1e-8)
            self.phases += [_Phase(name + "main", module, opt, 1, loss), _Phase(name + "reg", module, opt, interval, loss)]
        self.ema_kimg, self.ema_rampup = batch * 10 / 32, 0.05
        self.batch_idx, self.cur_nimg = 0, 0

    def step(self, real: torch.Tensor) -> None:
        real = real.to(self.device)
        no_label = torch.zeros([self.batch, 0], device=self.device)
        all_z = torch.randn([len(self.phases) * self.batch, 512], device=self.device).split(self.batch)
        for phase, z in zip(self.phases, all_z):
            if self.batch_idx % phase.interval != 0:
                continue
            phase.opt.zero_grad(set_to_none=True)
            phase.module.requires_grad_(True)
            phase.accumulate(real, no_label, z, no_label)
            phase.module.requires_grad_(False)
            for param in phase.module.parameters():
                if param.grad is not None:
                    torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            phase.opt.step()
        self._update_ema()
        self.cur_nimg += self.batch
        self.batch_idx += 1

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_nimg = min(self.ema_kimg * 1000, self.cur_nimg * self.ema_rampup)
        beta = 0.5 ** (self.batch / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)
