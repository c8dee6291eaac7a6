"""Projection ("inversion"): the latent of a real image, and pivotal tuning around it.

- ``search``: the latent search (W or W+; the reference projector's method) -> :class:`Projection`
- ``pivotal``: fine-tune a copy of the generator around the projected latent -> :class:`Tuned`
- ``distances``: what is minimised (``pixel-msssim``, weights-free) and PSNR; ``vgg16``: the LPIPS-style
  distance on VGG16 features from a local weights file; ``choose``: ``--distance auto|vgg16|pixel-msssim``

Pure PyTorch: files, Ray and HTTP live in ``styleray.platform.projection`` and ``styleray.serve``.
"""
