"""maeframe's built-in plugins. Each module registers through the "maeframe" entry-point group, exactly
as a third-party plugin does (see docs/plugins.md)."""
