"""Curriculum masking: a schedule of mask ratio and strategy mixing around other maskers."""
