"""Reading the TOML recipes behind `--config`, with errors users can act on."""

import tomllib
from pathlib import Path

from .errors import RadioDistillError


def read_toml(path: str | Path | None) -> dict:
    """The file's table, or {} when no file is given."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise RadioDistillError(f"config '{path}': {e}") from None
