"""Structured maskers: block (BEiT), tube (VideoMAE), running cell (VideoMAE v2), time/frequency (AudioMAE)."""
