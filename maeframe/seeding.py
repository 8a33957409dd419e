"""Per-sample seeding of the global Python and NumPy generators that third-party augmentations draw from."""
from __future__ import annotations

import contextlib
import random

import numpy as np


@contextlib.contextmanager
def python_numpy_seeded(seed: int):
    """Seed Python's and NumPy's global generators for the block, then put their states back (timm's
    RandAugment, RandomErasing and Mixup draw from them; the engine seeds torch per sample and step)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
