"""maeframe-plugin-example: adds the `grid` masker (grid-wise sampling from the MAE paper).

maeframe imports this module through the entry point `example` in the group "maeframe" and calls the
hook implementations it finds here; nothing else is needed to make `masker: {name: grid}` work.
"""
from maeframe import hookimpl

from .grid import GridMasker, GridOptions

__version__ = "0.1.0"
__all__ = ["GridMasker", "GridOptions", "register_maskers"]


@hookimpl
def register_maskers(register):
    register("grid", GridMasker)
