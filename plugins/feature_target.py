"""Feature targets from a frozen timm teacher or an EMA copy of the encoder."""
