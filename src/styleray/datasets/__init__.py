"""Data: preparing raw images (``prepare/``), reading prepared datasets for training (``read/``), and the
built-in sample dataset (``synthetic.py``). Never imports ``platform`` or ``serve``."""
