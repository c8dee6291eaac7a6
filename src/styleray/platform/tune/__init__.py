"""Hyperparameter sweeps (``styleray tune``): Ray Tune over Ray Train runs.

    space.py    the search space file, checked before anything runs
    driver.py   the objective, the scheduler and search, the Tuner (run_sweep)
    trial.py    one trial: a Tune Trainable around ray_train.fit, PBT exploits
    results.py  the ranked table and best_config.yaml
"""
