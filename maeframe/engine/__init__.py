"""Engines that run a recipe: pretraining now; fine-tuning, linear probing and kNN build on the same parts."""
