"""Trainers on one shared infrastructure: DINO (thesis 3.2), CutLER (3.3, Tables 1-2), GroupViT (4.5, 5.5-5.10).

Each trainer is a package (``dino``, ``cutler``, ``groupvit``) with a config dataclass of defaults, YAML
recipes and a loop; what they share lives in :mod:`~nbsupport.training.common` (schedules, checkpoints,
metrics log, seeding, the logging loop) and in :mod:`nbsupport.core` (config, I/O, distributed set-up).
Import the packages directly (``from nbsupport.training import cutler``); this file imports nothing.
"""

__all__ = ["common", "cutler", "dino", "groupvit"]
