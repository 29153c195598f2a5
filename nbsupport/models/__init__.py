"""Models: ViT backbones (DINO and others), the feature extractor, GroupViT, official weights on disk.

Import the modules directly (``from nbsupport.models import backbones``); this file imports nothing, so
loading one model family does not load the others:

- :mod:`~nbsupport.models.checkpoints` - the one download-and-verify path for official weights
  (``fetch_release``: cache, size and SHA-256 checks, ``NBSUPPORT_OFFLINE``), loader errors, a restricted
  unpickler;
- :mod:`~nbsupport.models.backbones` - timm ViTs: official DINO, seeded random inits, shipped and local files;
- :mod:`~nbsupport.models.features` - keys / queries / values / tokens / attention as feature grids;
- :mod:`~nbsupport.models.groupvit` - GroupViT: model, weights, tokenizer, zero-shot inference.
"""

__all__ = ["backbones", "checkpoints", "features", "groupvit"]
