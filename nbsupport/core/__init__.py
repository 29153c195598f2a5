"""Infrastructure shared by every room: paths, command-line helpers, configs, I/O, distributed set-up.

Import the modules directly (``from nbsupport.core.config import load_config``); this file imports nothing,
so ``nbsupport.core.paths`` stays cheap (``distributed`` needs torch):

- :mod:`~nbsupport.core.paths` - project root, data, cache and run folders;
- :mod:`~nbsupport.core.cli` - command-line helpers (strict booleans);
- :mod:`~nbsupport.core.config` - the one config mechanism (dataclass defaults < YAML recipe < ``-o`` < flags);
- :mod:`~nbsupport.core.io` - atomic writes and the JSON-lines log;
- :mod:`~nbsupport.core.distributed` - ``torchrun`` set-up and collectives.
"""

__all__ = ["cli", "config", "distributed", "io", "paths"]
