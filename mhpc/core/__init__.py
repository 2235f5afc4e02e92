"""Model, backbones and patch-feature extraction."""
