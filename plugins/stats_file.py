"""The statistics files `maeframe image-stats --write` and `audio-stats --write` leave for `stats_file` options."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_stats_file(stats: dict[str, Any], target: str, recipe: str, dataset: str) -> str:
    """Write `stats` (with the recipe and dataset they came from) to `target` atomically; returns the path."""
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**{k: v for k, v in stats.items() if k != "path"}, "recipe": str(recipe),
                               "dataset": dataset}, indent=2) + "\n")
    os.replace(tmp, path)
    return str(path)
