"""What folder datasets pass over, counted by reason and logged in one line per dataset (logger
"maeframe.data"), so that a format or folder left out is never skipped silently."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from maeframe import Options

log = logging.getLogger("maeframe.data")

OUTSIDE_CLASSES = "directly under the root, outside any class folder"


def extension_reason(path: str | Path) -> str:
    """The reason a file whose suffix is not taken is passed over, e.g. 'with extension .txt'."""
    suffix = Path(path).suffix.lower()
    return f"with extension {suffix}" if suffix else "without an extension"


def log_passed_over(dataset: str, root: str | Path, reasons: Counter, chosen: tuple[str, ...] = (),
                    taken: str = "") -> None:
    """Log e.g. 'audio_folder: passed over 12 files under ROOT: 10 with extension .txt, 2 directly under ...'.

    A warning, unless every reason is in `chosen` (exclusions the options ask for, such as a `pattern` or a
    `classes` list): those are logged at info level. `taken` says which suffixes are read; it is added when
    files were passed over for their extension. Nothing is logged when `reasons` is empty."""
    reasons = +reasons  # drop reasons counted 0 times
    total = sum(reasons.values())
    if not total:
        return
    parts = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    by_suffix = any(reason.startswith(("with extension", "without an extension")) for reason in reasons)
    hint = f" (taken: {taken})" if taken and by_suffix else ""
    level = logging.INFO if set(reasons) <= set(chosen) else logging.WARNING
    log.log(level, "%s: passed over %d file%s under %s: %s%s", dataset, total, "" if total == 1 else "s", root,
            parts, hint)


def preprocessing_options(options: dict[str, Any], reader: type[Options], dropped: tuple[str, ...] = ()) -> Options:
    """A file reader's options from a recipe's dataset options (`Dataset.from_files`; of any dataset class of
    the modality): the fields `reader` declares, less `dropped` (fields that locate, limit or cache data);
    the reader's other fields keep their defaults."""
    return reader.model_validate({key: value for key, value in options.items()
                                  if key in reader.model_fields and key not in dropped})
