"""Analyses of feature grids: affinity, correspondences, entropy, embeddings, metrics, ground truth on patch grids."""
