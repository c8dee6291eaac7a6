"""The training step: exact resume, lazy regularisation, EMA, ADA wiring, process-group consistency."""

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from styleray.config import ModelConfig, TrainConfig
from styleray.models import loss as L
from styleray.models.training import StyleGAN2Trainer, lazy_adam_hparams


def tiny_cfgs(**train_kw):
    model = ModelConfig(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16, mbstd_group=2)
    kw = dict(batch=4, r1_gamma=1.0, r1_interval=4, pl_interval=2, ema_kimg=0.01, ema_rampup=0.05,
              augment="ada", augment_p=0.2, ada_interval=2, ada_kimg=1.0, tick_kimg=0.01)
    kw.update(train_kw)
    return model, TrainConfig(**kw)


def reals(step: int, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand([n, 3, 16, 16], generator=g) * 2 - 1


def flat_params(trainer: StyleGAN2Trainer) -> torch.Tensor:
    nets = [trainer.G, trainer.D, trainer.G_ema]
    return torch.cat([p.detach().flatten() for net in nets for p in net.parameters()])


def test_resume_is_exact():
    """N steps, save, reload into a fresh object, N more == 2N uninterrupted (to 1e-6)."""
    n = 8
    model, train = tiny_cfgs()
    ref = StyleGAN2Trainer(model, train)
    for i in range(2 * n):
        ref.step(reals(i))

    first = StyleGAN2Trainer(model, train)
    for i in range(n):
        first.step(reals(i))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    torch.randn(100)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed = StyleGAN2Trainer(model, train)
    resumed.load_state_dict(state)
    assert resumed.batch_idx == n and resumed.cur_nimg == n * 4
    for i in range(n, 2 * n):
        resumed.step(reals(i))

    assert resumed.cur_nimg == ref.cur_nimg
    assert resumed.augment_p == pytest.approx(ref.augment_p, abs=1e-9)
    assert float(resumed.pl_mean) == pytest.approx(float(ref.pl_mean), abs=1e-6)
    assert (flat_params(resumed) - flat_params(ref)).abs().max().item() <= 1e-6


def test_phases_and_lazy_regularisation_hparams():
    lr, betas = lazy_adam_hparams(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17)
    assert betas[0] == 0.0 and betas[1] == pytest.approx(0.99 ** (16 / 17))
    model, train = tiny_cfgs(r1_interval=16, pl_interval=4)
    tr = StyleGAN2Trainer(model, train)
    assert [(p.name, p.interval) for p in tr.phases] == [("Gmain", 1), ("Greg", 4), ("Dmain", 1), ("Dreg", 16)]
    assert tr.opt_G.param_groups[0]["lr"] == pytest.approx(train.lr_g * 0.8)
    # Regularisers run only on their interval: step 0 has both penalties, step 1 neither.
    s0, s1 = tr.step(reals(0)), tr.step(reals(1))
    assert "pl_penalty" in s0 and "r1_penalty" in s0
    assert "pl_penalty" not in s1 and "r1_penalty" not in s1
    no_reg = StyleGAN2Trainer(model, TrainConfig(**{**train.__dict__, "pl_weight": 0.0, "r1_gamma": 0.0}))
    assert [p.name for p in no_reg.phases] == ["Gmain", "Dmain"]
    assert no_reg.opt_D.param_groups[0]["lr"] == train.lr_d


def test_ema_tracks_generator_with_rampup():
    model, train = tiny_cfgs(ema_kimg=0.004, ema_rampup=None, augment="noaug")
    tr = StyleGAN2Trainer(model, train)
    before = [p.clone() for p in tr.G_ema.parameters()]
    tr.step(reals(0))
    beta = 0.5 ** (4 / 4.0)  # batch 4, half-life 4 images
    for b, pe, p in zip(before, tr.G_ema.parameters(), tr.G.parameters()):
        torch.testing.assert_close(pe, p.detach().lerp(b, beta))


def test_ada_p_moves_by_one_adjustment_per_interval():
    model, train = tiny_cfgs(augment_p=0.1, ada_interval=2, ada_kimg=1.0)
    tr = StyleGAN2Trainer(model, train)
    p0 = tr.augment_p
    tr.step(reals(0))
    assert tr.augment_p == p0  # not due yet
    stats = tr.step(reals(1))
    step = 4 * 2 / 1000  # batch * interval / (ada_kimg * 1000)
    assert abs(tr.augment_p - p0) == pytest.approx(step, abs=1e-7)
    assert (tr.augment_p > p0) == (stats["r_t"] > train.ada_target)


def test_losses_on_known_functions():
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    logits = (x * 2).sum(dim=[1, 2, 3])  # dD/dx = 2 everywhere -> |grad|^2 = 4 * 4 pixels
    torch.testing.assert_close(L.r1_penalty(x, logits), torch.full([3], 16.0))
    torch.testing.assert_close(L.nonsaturating_g_loss(torch.zeros(2)), torch.full([2], 0.6931472))
    ws = torch.randn(2, 3, 4, requires_grad=True)
    img = ws.sum(dim=(1, 2)).reshape(2, 1, 1, 1).expand(2, 1, 4, 4) * 1.0
    pen, mean = L.path_length_penalty(img, ws, torch.zeros([]), decay=1.0)
    assert pen.shape == (2,) and torch.isfinite(pen).all()
    assert mean.item() > 0


def test_bad_batch_shape_is_rejected():
    model, train = tiny_cfgs()
    tr = StyleGAN2Trainer(model, train)
    with pytest.raises(ValueError, match="per-worker batch"):
        tr.step(torch.zeros(3, 3, 16, 16))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, train = tiny_cfgs(batch=8, workers=2)
        tr = StyleGAN2Trainer(model, train)
        for i in range(5):
            tr.step(reals(10 * i + rank))  # different data on each rank
        state = tr.state_dict()  # collective
        torch.save({"params": flat_params(tr), "p": tr.augment_p, "rng": len(state["rng"])}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_stay_identical(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert torch.equal(r0["params"], r1["params"])
    assert r0["p"] == r1["p"] and r0["rng"] == 2
