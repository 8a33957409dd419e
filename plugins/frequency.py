"""Frequency-domain targets: per-patch FFT amplitude/phase and low/high-pass bands."""
