"""``styleray project``: real images into a generator's latent space, as files (the search itself, pure
PyTorch, is :mod:`styleray.models.projection`).

    run.py      run_project: one image file here, or a folder, zip or bucket as a Ray job
    options.py  ProjectOptions: every setting of ``styleray project``, checked
    single.py   one target: frame -> search -> pivotal tuning (optional) -> its folder; the CLI's one-image path
    job.py      a folder, zip or bucket of targets as a Ray job (Ray Data, one projection per actor, resumable)
    outputs.py  the files of a projection (npz, PNGs, GIF, summary.json) and reading a projected latent back
    plot.py     the distance/PSNR curve, drawn with Pillow
"""
