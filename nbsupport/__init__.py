"""nbsupport: the tested support package behind the research notebooks.

Data flows one way: image -> backbone -> feature grid -> analysis -> figure. Each module holds one
idea (``backbones``, ``features``, ``affinity``, ``data``, ``viz``, ``runner``, ...); notebooks only set
parameters, call into these modules and plot.
"""

__version__ = "0.1.0"
