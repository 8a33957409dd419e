"""Uniformity loss (Wang & Isola) on mean-pooled encoder features."""
