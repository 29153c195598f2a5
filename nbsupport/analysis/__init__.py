"""Analyses of feature grids ``[B, h, w, D]``: what the thesis and its supporting papers measure.

Import the modules directly (``from nbsupport.analysis import affinity``); this file imports nothing:

- :mod:`~nbsupport.analysis.grid_truth` - ground truth on a patch grid (the one majority rule);
- :mod:`~nbsupport.analysis.affinity` - similarity / distance measures, separability, prompt-patch maps
  (thesis 4.1, Fig 8, Fig 26; MMC); :mod:`~nbsupport.analysis.affinity_protocols` - notebook 01's and 07's
  studies built on them;
- :mod:`~nbsupport.analysis.correspondences` - best buddies and relaxed best buddies (thesis 2.3, 4.2);
  :mod:`~nbsupport.analysis.correspondence_protocols` - notebook 02's prototype / query studies;
- :mod:`~nbsupport.analysis.entropy` - GroupViT entropy maps and regularisers (Eq 36-44);
- :mod:`~nbsupport.analysis.group_tokens` - GroupViT's grouping vs alignment analyses (section 5.4, Eq 47-51);
- :mod:`~nbsupport.analysis.embedding` - t-SNE / UMAP of tokens, kNN purity;
- :mod:`~nbsupport.analysis.zero_shot` - zero-shot segmentation mIoU on batches;
  :mod:`~nbsupport.analysis.zero_shot_protocol` - the thesis / GroupViT evaluation settings per dataset;
  :mod:`~nbsupport.analysis.segmentation_eval` - dataset-scale, resumable zero-shot evaluation
  (``groupvit-eval``); :mod:`~nbsupport.analysis.segmentation_figures` - the data of chapter 5's figures;
- :mod:`~nbsupport.analysis.prompt_patch` - MMC's prompt-patch sweep at its own setting;
- :mod:`~nbsupport.analysis.probes` - cluster and linear probes on frozen features (STEGO / HP, Leopart /
  CrOC, MMC), with a feature cache and tables beside the published numbers;
- :mod:`~nbsupport.analysis.hidden_positives` (HP), :mod:`~nbsupport.analysis.online_clustering` (CrOC),
  :mod:`~nbsupport.analysis.label_propagation` (DAVIS-2017 label propagation, J and F);
- :mod:`~nbsupport.analysis.metrics` - COCO AP, mask IoU and recall, confusion matrices and mIoU.
"""

__all__ = [
    "affinity",
    "affinity_protocols",
    "correspondence_protocols",
    "correspondences",
    "embedding",
    "entropy",
    "grid_truth",
    "group_tokens",
    "hidden_positives",
    "label_propagation",
    "metrics",
    "online_clustering",
    "probes",
    "prompt_patch",
    "segmentation_eval",
    "segmentation_figures",
    "zero_shot",
    "zero_shot_protocol",
]
