"""Files shipped inside the package (``batchflip/data/``), found with importlib.resources.

They are package data, so they are where the imported ``batchflip`` is: in a checkout
(``src/batchflip/data/``), an editable install or a wheel alike. The workflow's rules list
them as inputs through :func:`bundled_path`, so a rule reads the same file the package
reads by default.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from batchflip.errors import BatchflipError

REFUSAL_PATTERNS = "scorers/refusal_patterns.yaml"
ADJUDICATION_SCHEMA = "schemas/adjudication_sheet.schema.yaml"
PUBLISHED = "fidelity/published.yaml"
BUNDLED = (REFUSAL_PATTERNS, ADJUDICATION_SCHEMA, PUBLISHED)


def data_root() -> Path:
    """The package's data folder as a file-system path."""
    root = files("batchflip").joinpath("data")
    if not isinstance(root, Path):
        raise BatchflipError(f"batchflip's package data is not on the file system ({root}); "
                             "install batchflip as files (pip install), not zipped")
    return root


def bundled_path(name: str) -> Path:
    """Path of one bundled file, e.g. ``bundled_path(REFUSAL_PATTERNS)``."""
    if name not in BUNDLED:
        raise BatchflipError(f"'{name}' is not a bundled file (bundled: {', '.join(BUNDLED)})")
    path = data_root() / name
    if not path.is_file():
        raise BatchflipError(f"{path}: bundled file missing from the installed package "
                             "(reinstall batchflip)")
    return path


def shown(path: str | Path) -> str | None:
    """``batchflip/data/<name>`` for a path inside the package's data folder, else None:
    a name for a bundled file that does not depend on where the package is installed."""
    p = Path(path).resolve()
    root = data_root().resolve()
    if not p.is_relative_to(root):
        return None
    return (Path("batchflip/data") / p.relative_to(root)).as_posix()
