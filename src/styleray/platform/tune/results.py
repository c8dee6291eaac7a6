"""A sweep's results: a ranked table (CSV and Markdown) and the best trial as a `styleray train --config` file.

    OUT/results.csv        one row per trial, best first: rank, trial, status (finished, stopped early by the
                           scheduler, error), the objective's best and last
                           values, fid/kid/diversity at that point, kimg, exploits (PBT), hyperparameters,
                           the trial's run folder and best checkpoint
    OUT/results.md         the same, for reading; its first line states the objective (and whether it is a proxy)
    OUT/best_config.yaml   the best trial's complete train settings (base settings + its hyperparameters,
                           --metrics on), ready for `styleray train --config OUT/best_config.yaml --out RUN`

Trials are ranked by the lowest objective value they reported (lower is better for FID, KID and their
proxies); trials that reported none come last. With PBT a trial's hyperparameters change during the run:
the table and the YAML hold its final ones.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from styleray.platform import checkpoint as ckpt_lib
from styleray import storage

def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _trial_row(result, objective, hp_keys: tuple[str, ...]) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    trial_id = metrics.get("styleray_trial") or metrics.get("trial_id") or storage.absolute(result.path).rsplit("/", 1)[-1]
    best = last = None
    history = result.metrics_dataframe
    if history is not None and objective.key in getattr(history, "columns", ()):
        values = [v for v in history[objective.key].tolist() if _number(v) is not None]
        if values:
            best, last = min(values), values[-1]
    run_dir = metrics.get("run_dir")
    best_json = ckpt_lib.read_best(run_dir) if run_dir else None
    exploits = 0
    if run_dir and storage.exists(storage.join(run_dir, "exploits.jsonl")):
        exploits = sum(1 for line in storage.read_bytes(storage.join(run_dir, "exploits.jsonl")).decode().splitlines() if line.strip())
    target = None
    if run_dir and storage.exists(storage.join(run_dir, "config.json")):
        target = json.loads(storage.read_bytes(storage.join(run_dir, "config.json")))["train"]["kimg"]
    kimg = _number(metrics.get("kimg"))
    if result.error:
        status = "error"
    elif target is not None and kimg is not None and kimg < target - 1e-9:
        status = "stopped"  # by the scheduler (ASHA), before its --kimg
    else:
        status = "finished"
    row = {
        "trial": trial_id,
        "status": status,
        f"best_{objective.name}": best,
        f"last_{objective.name}": last,
        "fid": _number(metrics.get("fid")),
        "kid": _number(metrics.get("kid")),
        "diversity_ratio": _number(metrics.get("diversity_ratio")),
        "kimg": kimg,
        "ticks": metrics.get("tick"),
        "exploits": exploits,
    }
    row.update({k: (result.config or {}).get(k) for k in hp_keys})
    row.update(run_dir=run_dir, best_checkpoint=(best_json or {}).get("uri"),
               error=str(result.error).splitlines()[0][:200] if result.error else "")
    return row


def rank_rows(rows: list[dict[str, Any]], objective) -> list[dict[str, Any]]:
    key = f"best_{objective.name}"
    rows = sorted(rows, key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0.0, r["trial"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["rank"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], objective, title: str) -> str:
    cols = [c for c in (rows[0] if rows else {}) if c not in ("run_dir", "error")]
    lines = [f"# {title}", "", f"Objective: **{objective.name}**, lower is better: {objective.note}.", ""]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |")
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "Failed trials:", ""] + [f"- {r['trial']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def best_settings(sweep, hp: dict[str, Any], objective) -> dict[str, Any]:
    """The complete train settings of a trial with these hyperparameters (those that differ from the
    defaults, without where the trial's run went), with the objective measured during training."""
    from styleray.platform.tune.sweep import trial_settings

    settings = trial_settings(sweep, hp, storage.join(sweep.out, "best-run")).changed(portable_only=True)
    settings.update(metrics="fid,kid", metrics_every=sweep.metrics_every)
    if objective.extractor != "inception-v3":
        settings["extractor"] = objective.extractor
    if objective.weights:
        settings["inception"] = objective.weights
    return settings


def best_config_yaml(settings: dict[str, Any], header: list[str]) -> str:
    import yaml

    body = yaml.safe_dump(settings, sort_keys=True, default_flow_style=False)
    return "".join(f"# {line}\n" for line in header) + body


def write_results(out: str, grid, sweep, objective, space) -> dict[str, Any]:
    """Write results.csv, results.md and best_config.yaml into ``out``; returns a summary."""
    hp_keys = space.keys
    rows = rank_rows([_trial_row(r, objective, hp_keys) for r in grid], objective)
    storage.write_bytes(storage.join(out, "results.csv"), to_csv(rows).encode())
    storage.write_bytes(storage.join(out, "results.md"), to_markdown(rows, objective, f"Sweep {out}").encode())
    summary: dict[str, Any] = {"objective": objective.name, "proxy": objective.proxy, "rows": rows,
                               "results_csv": storage.join(out, "results.csv"),
                               "results_md": storage.join(out, "results.md")}
    best = rows[0] if rows and rows[0][f"best_{objective.name}"] is not None else None
    if best is None:
        summary["best"] = None
        return summary
    hp = {k: best[k] for k in hp_keys}
    settings = best_settings(sweep, hp, objective)
    header = [
        f"best trial {best['trial']} of the sweep in {out}",
        f"objective {objective.name} = {best[f'best_{objective.name}']:.6g} ({objective.note})",
        f"use: styleray train --config {storage.join(out, 'best_config.yaml')} --out RUN",
    ]
    path = storage.join(out, "best_config.yaml")
    storage.write_bytes(path, best_config_yaml(settings, header).encode())
    summary.update(best=best, best_config=path, settings=settings)
    storage.write_bytes(storage.join(out, "results.json"),
                        json.dumps({k: v for k, v in summary.items() if k != "rows"} | {"rows": rows},
                                   default=str, indent=2).encode())
    return summary
