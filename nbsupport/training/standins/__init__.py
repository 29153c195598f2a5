"""Supervised stand-ins for the offline notebooks: small models trained with the synthetic world's labels
(patch classes, image classes, instance masks, captions), so offline figures show class structure and
grouping where the self-supervised tiny models show little (docs/experiments/offline_models.md).

- :mod:`.vit`: ``tiny_vit_synth_supervised``, a timm ViT/8 (the tiny DINO's family);
- :mod:`.groupvit`: ``tiny_groupvit_synth_supervised``, a tiny GroupViT whose final groups are matched to
  the instance masks (not shipped yet: its zero-shot mIoU stays below all-background);
- :mod:`.cli`: ``python -m nbsupport standin train --recipe NAME``.
"""

from __future__ import annotations

from .config import CONFIGS, RECIPE_DIR, GroupvitConfig, VitConfig

__all__ = ["CONFIGS", "RECIPE_DIR", "GroupvitConfig", "VitConfig"]
