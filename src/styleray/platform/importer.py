"""``styleray import``: an NVIDIA network pickle -> a styleray run folder with one checkpoint.

    read FILE.pkl (local or s3://)          models.interop.nvidia_pickle: plain data, nothing in the file run
    -> configuration + state dicts          models.interop.nvidia_networks: every tensor accounted for
    -> a trainer holding G, D and G_ema     fresh optimizers; the snapshot's ADA p, if it has an augment pipe
    -> RUN/checkpoints/ckpt-000000000000    the normal checkpoint format (checkpoint.py): generate, serve,
                                            metrics, train --init-from read it like any other
       RUN/config.json, RUN/import.json     the RunSpec; what was imported (source, SHA-256, configuration,
                                            parameter counts, augment p, dataset settings, notes)

Nothing is written until the whole file has been read and mapped, and a run folder that already holds
checkpoints is never overwritten. The checkpoint is committed atomically (meta.json last).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from styleray import storage
from styleray.config import RunSpec, TrainConfig

log = logging.getLogger(__name__)

IMPORT_FILE = "import.json"
PRESET = "imported"  # RunSpec.preset of an imported run: its training settings are styleray's defaults


def import_network(source: str, out: str) -> dict[str, Any]:
    """Import ``source`` (an NVIDIA network pickle) into the run folder ``out``; returns the report written to
    OUT/import.json. ValueError (NetworkPickleError for the file) with a message naming the problem."""
    from styleray.models.interop.nvidia_networks import convert_networks
    from styleray.models.interop.nvidia_pickle import read_network_pickle
    from styleray.platform import checkpoint as ckpt_lib

    source, out = storage.absolute(source), storage.absolute(out)
    if ckpt_lib.list_checkpoints(out):
        raise ValueError(f"--out {out} already holds checkpoints: import into a new run folder")
    blob = _read(source)
    imported = convert_networks(read_network_pickle(blob, source), source)
    for note in imported.notes:
        log.warning("%s: %s", source, note)
    run = RunSpec(model=imported.model, train=_train_config(imported), preset=PRESET, out=out)
    report = {
        "source": source, "sha256": hashlib.sha256(blob).hexdigest(), "model": run.to_dict()["model"],
        "parameters": imported.parameters, "augment_p": imported.augment_p,
        "training_set": imported.training_set, "notes": list(imported.notes),
    }
    report["checkpoint"] = _write_run(imported, run, report)
    return report


def _read(source: str) -> bytes:
    try:
        return storage.read_bytes(source)
    except FileNotFoundError:
        raise ValueError(f"{source} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{source} is a folder; give the network pickle (.pkl) itself") from None
    except OSError as e:
        raise ValueError(f"{source} cannot be read: {e.strerror or e}") from None


def _train_config(imported) -> TrainConfig:
    """styleray's default schedule, with the snapshot's mirroring and ADA p (an imported run is a starting
    point: `styleray train --init-from` chooses the schedule of the runs made from it)."""
    batch = 32 if 32 % imported.model.mbstd_group == 0 else 8 * imported.model.mbstd_group
    xflip = (imported.training_set or {}).get("xflip")
    return TrainConfig(batch=batch, augment_p=min(max(imported.augment_p or 0.0, 0.0), 1.0), mirror=bool(xflip))


def _write_run(imported, run: RunSpec, report: dict[str, Any]) -> str:
    """A trainer holding the imported networks, saved as the run's only checkpoint (kimg 0); its URI."""
    import torch

    from styleray.models.training import StyleGAN2Trainer
    from styleray.platform import checkpoint as ckpt_lib
    from styleray.platform.train.loop import sample_grid_png

    trainer = StyleGAN2Trainer(run.model, run.train, "cpu")
    for name, module in (("G", trainer.G), ("D", trainer.D), ("G_ema", trainer.G_ema)):
        module.load_state_dict(imported.states[name])
    if trainer.augment_pipe is not None:
        trainer.augment_pipe.p.copy_(torch.as_tensor(run.train.augment_p))
    meta = {"cur_nimg": 0, "kimg": 0.0, "tick": 0, "metrics": {}, "stable": True, "rollbacks": 0,
            "imported_from": report["source"], "sha256_source": report["sha256"]}
    try:
        uri = ckpt_lib.save_checkpoint(run.out, trainer.state_dict(), config=run.to_dict(), meta=meta,
                                       grid_png=sample_grid_png(trainer))
        storage.write_bytes(storage.join(run.out, "config.json"), run.to_json().encode())
        storage.write_bytes(storage.join(run.out, IMPORT_FILE),
                            json.dumps({**report, "checkpoint": uri}, indent=2, sort_keys=True).encode())
    except OSError as e:
        raise ValueError(f"--out {run.out} is not writable: {e.strerror or e}") from None
    return uri


def describe(report: dict[str, Any]) -> str:
    """The import in a few lines: the configuration found, the parameter counts, what else came along."""
    m = report["model"]
    lines = [
        f"imported {report['source']} -> {report['checkpoint']}",
        f"  model: {m['resolution']} px, {m['img_channels']} channel(s), "
        f"{'conditional, ' + str(m['c_dim']) + ' classes' if m['c_dim'] else 'unconditional'}; z {m['z_dim']}, "
        f"w {m['w_dim']}, mapping {m['mapping_layers']} layers; channel_base {m['channel_base']}, channel_max "
        f"{m['channel_max']}; minibatch-std group {m['mbstd_group']}; reduced precision on the top "
        f"{m['num_fp16_res']} resolutions, conv_clamp {m['conv_clamp']}",
        f"  parameters: G {report['parameters']['G']:,}, D {report['parameters']['D']:,} (G_ema as G)",
        f"  augment p: {report['augment_p'] if report['augment_p'] is not None else 'none in the file'}",
    ]
    if report.get("training_set"):
        ts = report["training_set"]
        lines.append(f"  trained on: {ts.get('path')} (xflip {ts.get('xflip')}, labels {ts.get('use_labels')})")
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
