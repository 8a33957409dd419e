"""HOG target (MaskFeat)."""
