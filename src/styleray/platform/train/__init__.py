"""Training runs.

    ray_train.py  Ray Train: the driver's fit() and each worker's train_loop_per_worker
    local.py      fit_local(): the same loop in this process (``styleray train --no-ray``)
    run.py        train(settings): TrainSettings -> metrics plan, resolved run -> fit or fit_local
    loop.py       the loop both share: ticks, snapshots, best.json, rollbacks
    stability.py  NaN/Inf and discriminator-collapse detection
    metrics.py    FID/KID during training (the plan made on the driver, the evaluator on every rank)
"""
