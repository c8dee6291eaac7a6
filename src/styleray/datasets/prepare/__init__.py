"""``styleray prepare``: raw images -> a clean, square, white-background dataset (Ray Data).

    config.py         PrepareConfig: every setting of a preparation, checked
    run.py            prepare_dataset: list -> per-image pipeline -> decide -> label -> publish -> report
    sources.py        where raw images come from (folder, .zip, s3://) and the output store
    pipeline.py       the per-image stages (load -> segment -> finish) on Ray Data or in a loop
    decode.py         bytes -> RGB(A), with every awkward image mode handled and bombs refused
    checks.py         outlier measures (foreground, frame touch, cartoon score, perceptual hash)
    removers.py       background removal: classic (no weights) or rembg (a local ONNX file)
    classic.py        the classic remover's background model
    square.py         crop to the figure, pad to 1:1 on white, resize
    clustering.py     k-means labels for conditional training
    contact_sheet.py  the report's picture of accepted and rejected examples

A new per-image stage is one function in ``pipeline.py`` (called from ``process_image``); a new outlier
measure one function in ``checks.py`` with its decision in ``run.py``.
"""

__all__ = ["PrepareConfig", "PrepareReport", "prepare_dataset"]


def __getattr__(name: str):
    """The public names, imported on first use (``styleray prepare --help`` reads only config.py)."""
    if name == "PrepareConfig":
        from styleray.datasets.prepare.config import PrepareConfig

        return PrepareConfig
    if name in ("PrepareReport", "prepare_dataset"):
        from styleray.datasets.prepare import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
