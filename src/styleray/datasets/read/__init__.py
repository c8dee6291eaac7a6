"""The training side of a prepared dataset (never the preparation's code).

    folder.py    a local image folder decoded into memory, its labels, and the in-process batch sampler
                 (``styleray train --no-ray``, metrics)
    ray_data.py  the dataset's header (DatasetInfo), a Ray Dataset of it for Ray Train workers, and each
                 worker's shard as batches
"""
