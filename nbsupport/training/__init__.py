"""Trainers on one shared infrastructure (common.py): DINO, CutLER, GroupViT."""
