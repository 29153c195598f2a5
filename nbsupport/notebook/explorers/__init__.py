"""Interactive explorers of the notebooks: each draws one figure once and updates it in place, so a
change of a control or a click answers in well under a second; headless runs show the PNG only."""

from nbsupport.notebook.explorers.base import SNAPSHOT_NOTE, Control, Explorer
from nbsupport.notebook.explorers.groups import GroupTokenExplorer
from nbsupport.notebook.explorers.masks import MaskCutExplorer
from nbsupport.notebook.explorers.patches import BestBuddyExplorer, SimilarityExplorer

__all__ = [
    "SNAPSHOT_NOTE",
    "BestBuddyExplorer",
    "Control",
    "Explorer",
    "GroupTokenExplorer",
    "MaskCutExplorer",
    "SimilarityExplorer",
]
