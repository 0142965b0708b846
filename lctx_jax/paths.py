"""Paths on local disks and object stores (gs://, s3://, via `etils.epath`), and atomic writes.

    path = as_path("~/runs/x")            # local: user expanded, made absolute
    path = as_path("gs://bucket/runs/x")  # remote: kept as it is (never joined to the cwd)
    write_atomically(path / "config.json", text)

A local file is written to a temporary sibling and renamed over the target, so a reader (or a
rerun after `kill -9`) sees the old file or the new one, never half of one. An object store
writes an object whole, so a remote file is written directly.
"""

from __future__ import annotations

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
