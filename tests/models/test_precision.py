"""--precision: the choice for every card (a pure function, so a CPU machine checks all of them)."""

import dataclasses

import pytest
import torch

from styleray.models.precision import PRECISION_CHOICES, choose_precision

# (card, compute capability): the clusters users run (README), older and newer ones.
CARDS = [("K80", (3, 7)), ("P100", (6, 0)), ("V100", (7, 0)), ("T4", (7, 5)), ("A100", (8, 0)),
         ("A10G", (8, 6)), ("L4", (8, 9)), ("H100", (9, 0)), ("B200", (10, 0)), ("RTX 5090", (12, 0))]


@pytest.mark.parametrize("card,capability", CARDS, ids=[c for c, _ in CARDS])
def test_auto_picks_bf16_from_ampere_and_fp16_below(card, capability):
    choice = choose_precision("auto", "cuda", capability)
    assert choice.name == ("bf16" if capability >= (8, 0) else "fp16"), card
    assert choice.mixed_precision == choice.name and choice.reduced
    assert f"{capability[0]}.{capability[1]}" in choice.reason


@pytest.mark.parametrize("card,capability", CARDS, ids=[c for c, _ in CARDS])
@pytest.mark.parametrize("wish", ["fp32", "bf16", "fp16"])
def test_an_explicit_wish_runs_as_asked_on_cuda(card, capability, wish):
    choice = choose_precision(wish, "cuda", capability)
    assert choice.name == wish
    assert choice.mixed_precision == ("off" if wish == "fp32" else wish)
    assert ("slow" in choice.reason) == (wish == "bf16" and capability < (8, 0))


def test_cpu_trains_in_fp32_and_refuses_reduced_precision():
    for wish in ("auto", "fp32"):
        choice = choose_precision(wish, "cpu")
        assert (choice.name, choice.dtype, choice.reduced) == ("fp32", torch.float32, False)
    for wish in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"--precision {wish} needs a CUDA GPU.*auto"):
            choose_precision(wish, "cpu")


def test_bad_wishes_are_named():
    with pytest.raises(ValueError, match="'tf32' is not one of auto, fp32, bf16, fp16"):
        choose_precision("tf32", "cuda", (9, 0))
    with pytest.raises(ValueError, match="compute capability"):
        choose_precision("auto", "cuda", None)
    assert PRECISION_CHOICES[0] == "auto"


def test_the_trainer_decides_on_its_device_and_records_what_runs():
    from styleray.config import resolve_preset
    from styleray.models.training import StyleGAN2Trainer

    model, train = resolve_preset("cpu-tiny", resolution=16, train_overrides={"batch": 4})
    assert model.mixed_precision == "bf16"  # the preset's wish for GPUs
    trainer = StyleGAN2Trainer(model, train, "cpu")
    assert trainer.precision.name == "fp32" and trainer.G.cfg.mixed_precision == trainer.D.cfg.mixed_precision == "off"
    assert trainer.model_cfg == model and trainer.state_dict()["model_cfg"]["mixed_precision"] == "bf16"  # as asked
    assert trainer._D_main is trainer.D  # --compile off by default
    compiled = StyleGAN2Trainer(model, dataclasses.replace(train, compile=True), "cpu")  # compiles at first call
    assert compiled._D_main is not compiled.D
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA GPU"):
        StyleGAN2Trainer(model, dataclasses.replace(train, precision="fp16"), "cpu")
