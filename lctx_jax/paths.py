"""Paths on local disks and object stores (gs://, s3://, via `etils.epath`), and atomic writes.

    path = as_path("~/runs/x")            # local: user expanded, made absolute
    path = as_path("gs://bucket/runs/x")  # remote: kept as it is (never joined to the cwd)
    write_atomically(path / "config.json", text)
    hf = read_json(path / "config.json")  # a damaged file is a ValueError naming it

A local file is written to a temporary sibling and renamed over the target, so a reader (or a
rerun after `kill -9`) sees the old file or the new one, never half of one. An object store
writes an object whole, so a remote file is written directly.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def as_path(value: str | os.PathLike) -> epath.Path:
    """`value` as an epath.Path: a URL ("gs://...") as it is; a local path user-expanded and
    absolute."""
    text = os.fspath(value)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def write_atomically(path: Any, data: str | bytes) -> None:
    """Writes `data` (text or bytes) to `path`: complete or not at all."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path if not is_local(path) else path.parent / f".{path.name}.tmp-{os.getpid()}"
    if isinstance(data, str):
        target.write_text(data)
    else:
        target.write_bytes(data)
    if target != path:
        os.replace(target, path)


def read_json(path: Any, expect: type = dict) -> Any:
    """The JSON value in the file at `path`, which must be an `expect` (default: an object);
    ValueError naming the file, line and column for text that is not JSON (a truncated
    download, a hand edit)."""
    path = as_path(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column "
                         f"{err.colno}); fix or re-download the file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file ({err.reason}); it should be JSON"
                         ) from None
    if not isinstance(value, expect):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected a JSON "
                         f"{'object' if expect is dict else expect.__name__}")
    return value
