"""Models: ViT backbones (DINO and others), the feature extractor, GroupViT, checkpoint reading."""
