"""The training step: exact resume, lazy regularisation, EMA, ADA wiring, process-group consistency."""

import dataclasses
import functools
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.autograd import gradcheck

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


@pytest.mark.parametrize("batch_gpu", [None, 2])
def test_resume_is_exact(batch_gpu):
    """N steps, save, reload into a fresh object, N more == 2N uninterrupted (to 1e-6)."""
    n = 8
    model, train = tiny_cfgs(batch_gpu=batch_gpu)
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
    # A regulariser switched off leaves its phase out but keeps the lazy lr/beta correction (reference).
    no_reg = StyleGAN2Trainer(model, TrainConfig(**{**train.__dict__, "pl_weight": 0.0, "r1_gamma": 0.0}))
    assert [p.name for p in no_reg.phases] == ["Gmain", "Dmain"]
    assert no_reg.opt_D.param_groups[0]["lr"] == pytest.approx(train.lr_d * 16 / 17)
    assert no_reg.opt_D.param_groups[0]["betas"][1] == pytest.approx(0.99 ** (16 / 17))
    assert no_reg.opt_G.param_groups[0]["lr"] == pytest.approx(train.lr_g * 4 / 5)


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


def test_path_length_gradient_flows_through_the_batch_mean():
    """The running mean moves to lerp(pl_mean, mean(lengths), decay) with the batch mean kept in the graph, as in
    the reference: the penalty's analytic gradient then matches finite differences (with a detached mean it
    misses the decay-weighted mean term, ~1% early in training, and gradcheck fails)."""
    torch.manual_seed(0)
    ws0 = torch.randn(5, 2, 3, dtype=torch.float64)
    weight = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)  # a tiny nonlinear "generator"

    def penalty(weight: torch.Tensor) -> torch.Tensor:
        ws = ws0.clone().requires_grad_(True)
        img = torch.tanh(ws.sum(dim=1) @ weight).reshape(5, 1, 4, 4)
        with torch.random.fork_rng(devices=[]):  # the same projection noise at every evaluation
            torch.manual_seed(1)
            pen, _ = L.path_length_penalty(img, ws, torch.tensor(0.3, dtype=torch.float64), decay=0.5)
        return pen.sum()

    assert gradcheck(penalty, (weight,))


def _record_grads_at_optimizer_steps(trainer: StyleGAN2Trainer) -> list[dict[str, torch.Tensor]]:
    """Every optimizer step of the trainer records the gradients it is about to apply."""
    recorded: list[dict[str, torch.Tensor]] = []
    for opt, net in ((trainer.opt_G, trainer.G), (trainer.opt_D, trainer.D)):
        def step(*args, _opt_step=opt.step, _net=net, **kwargs):
            recorded.append({k: p.grad.clone() for k, p in _net.named_parameters() if p.grad is not None})
            return _opt_step(*args, **kwargs)

        opt.step = step
    return recorded


def test_rounds_accumulate_to_one_pass_of_the_same_images():
    """batch 8 in 4 rounds of 2 == one pass of 8, phase by phase (G main, D main, R1), up to rounding and the
    reference's own scale: each round adds its mean loss, so k rounds give k times the one-pass gradient (Adam's
    update does not depend on it). Where the reference's rounds differ from one pass, the test holds them
    still: minibatch-std groups form within a round (group 1 here); style mixing, augmentation and synthesis
    noise are drawn per round (off here; the main phases' synthesis uses its constant noise maps); and the
    path-length mean moves once per round (off here)."""
    model, _ = tiny_cfgs()
    model = ModelConfig(**{**model.__dict__, "mbstd_group": 1})
    grads = {}
    for batch_gpu in (None, 2):
        _, train = tiny_cfgs(batch=8, batch_gpu=batch_gpu, augment="noaug", style_mixing=0.0, pl_weight=0.0)
        trainer = StyleGAN2Trainer(model, train)
        trainer._synthesis_main = functools.partial(trainer.G.synthesis, noise_mode="const")
        grads[batch_gpu] = _record_grads_at_optimizer_steps(trainer)
        trainer.step(reals(0, n=8))
    assert [p.name for p in trainer.phases] == ["Gmain", "Dmain", "Dreg"] and len(grads[2]) == 3
    for one_pass, rounds in zip(grads[None], grads[2]):
        assert one_pass.keys() == rounds.keys()
        for name in one_pass:
            scale = one_pass[name].abs().max().item() + 1e-12
            torch.testing.assert_close(rounds[name] / 4 / scale, one_pass[name] / scale, atol=2e-5, rtol=0)


def test_path_length_mean_moves_once_per_round(monkeypatch):
    """Each round's penalty is taken against the running mean after that round's update (the reference)."""
    calls = []
    original = L.path_length_penalty

    def recording(img, ws, pl_mean, decay):
        penalty, new_mean = original(img, ws, pl_mean, decay)
        calls.append((img.shape[0], pl_mean.clone(), new_mean.detach().clone()))
        return penalty, new_mean

    monkeypatch.setattr(L, "path_length_penalty", recording)
    model, train = tiny_cfgs(batch=8, batch_gpu=4, pl_decay=0.5)
    trainer = StyleGAN2Trainer(model, train)
    trainer.step(reals(0, n=8))
    assert [c[0] for c in calls] == [2, 2]  # two rounds of 4 // pl_batch_shrink 2
    assert float(calls[0][1]) == 0.0 and torch.equal(calls[1][1], calls[0][2])
    assert torch.equal(trainer.pl_mean, calls[1][2]) and float(calls[1][2]) != float(calls[0][2])


def test_ada_counts_the_real_logits_of_the_r1_phase_too():
    model, train = tiny_cfgs(r1_interval=2, ada_interval=100)
    trainer = StyleGAN2Trainer(model, train)
    counts = []
    for i in range(3):  # R1 on steps 0 and 2
        trainer.step(reals(i))
        counts.append(int(trainer.ada.stats_tensor()[1]))
    assert counts == [8, 12, 20]


def test_trainer_leaves_the_global_rng_alone():
    """Building and stepping a trainer neither reseeds nor advances torch's global generator, and what the caller
    draws in between does not change the run."""
    model, train = tiny_cfgs()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    quiet = StyleGAN2Trainer(model, train)
    for i in range(3):
        quiet.step(reals(i))
    assert torch.equal(torch.get_rng_state(), before)
    busy = StyleGAN2Trainer(model, train)
    for i in range(3):
        torch.randn(1000)  # e.g. metrics or a sample grid between steps
        busy.step(reals(i))
    assert torch.equal(flat_params(quiet), flat_params(busy))


@pytest.mark.parametrize("allow", [False, True])
def test_tf32_is_set_for_the_step_and_restored_after(allow, monkeypatch):
    model, train = tiny_cfgs(allow_tf32=allow, augment="noaug")
    trainer = StyleGAN2Trainer(model, train)
    seen = []
    run_D = trainer.run_D
    monkeypatch.setattr(trainer, "run_D", lambda *a, **k: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)) or run_D(*a, **k))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    outside = (not allow, not allow)
    try:  # torch.backends' flags are module properties: set and restored by hand (monkeypatch cannot)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = outside
        trainer.step(reals(0))
        assert seen and set(seen) == {(allow, allow)}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == outside
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fake_labels_come_from_the_label_pool_when_given():
    model, train = tiny_cfgs()
    model = ModelConfig(**{**model.__dict__, "c_dim": 3})
    real_c = torch.eye(3)[[0, 1, 0, 1]]
    pool = torch.eye(3)[[2, 2, 2]]  # the dataset: only class 2
    trainer = StyleGAN2Trainer(model, train, label_pool=pool)
    rounds = trainer._rounds(reals(0), real_c)
    assert all(torch.equal(r.gen_c, torch.eye(3)[[2] * 4]) and torch.equal(r.real_c, real_c) for p in rounds for r in p)
    from_batch = StyleGAN2Trainer(model, train)._rounds(reals(0), real_c)
    assert all(bool((r.gen_c[:, 2] == 0).all()) for p in from_batch for r in p)
    trainer.step(reals(0), real_c)
    with pytest.raises(ValueError, match=r"label_pool must be the dataset's labels \[M, c_dim=3\]"):
        StyleGAN2Trainer(model, train, label_pool=torch.ones(5, 2))


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
        model, train = tiny_cfgs(batch=8, workers=2, batch_gpu=2)  # two rounds per rank
        tr = StyleGAN2Trainer(model, train)
        for i in range(5):
            tr.step(reals(10 * i + rank))  # different data on each rank
        state = tr.state_dict()  # collective
        torch.save({"params": flat_params(tr), "p": tr.augment_p, "rng": len(state["rng"]), "pl_mean": state["pl_mean"],
                    "own_pl_mean": tr.pl_mean.clone()}, f"{out}/rank{rank}.pt")
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
    # Each rank keeps its own path-length mean (the reference's per-GPU pl_mean); the checkpoint holds both.
    assert torch.equal(r0["pl_mean"], r1["pl_mean"]) and r0["pl_mean"].shape == (2,)
    assert r0["pl_mean"][0] == r0["own_pl_mean"] and r0["pl_mean"][1] == r1["own_pl_mean"]
    assert r0["own_pl_mean"] != r1["own_pl_mean"]


def test_cuda_defaults_are_chosen_without_a_gpu():
    """Channels-last by default on CPU and on CUDA in reduced precision, NCHW for fp32 CUDA (no GPU needed: a
    pure function of the device and the config)."""
    from styleray.models.training import default_channels_last

    model, _ = tiny_cfgs()
    assert default_channels_last(torch.device("cpu"), model)
    assert default_channels_last(torch.device("cuda"), model)  # mixed_precision defaults to bf16
    assert not default_channels_last(torch.device("cuda"), dataclasses.replace(model, mixed_precision="off"))
