"""Masked Laplacian loss: L1 between Laplacian-filtered prediction and target on hidden pixels."""
