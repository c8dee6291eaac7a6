"""Everything that runs on a Ray cluster around the models: checkpoints, training runs (``train/``), sweeps
(``tune/``) and the queue of training requests (``manager/``). Owns every Ray Train, Tune and Jobs call."""
