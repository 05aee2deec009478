"""Small file-system helpers shared by the savers."""

from __future__ import annotations

import os
import shutil
import tempfile


def atomic_folder_write(path: str | os.PathLike, write) -> str:
    """Call ``write(tmp_folder)``, then move the folder to ``path`` (replacing an existing one only at the end)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        write(partial)
        if os.path.exists(path):
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(aside, "old"))
            os.rename(partial, path)
            shutil.rmtree(aside)
        else:
            os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path
