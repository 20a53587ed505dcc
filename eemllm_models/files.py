"""Writing files so that a crash or a bad input never leaves a half-written result."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The parent directory is created if needed; if ``write`` raises, ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None],
                     carry: Sequence[str | os.PathLike] = ()) -> Path:
    """Call ``write(tmp)`` on a temporary folder next to ``path``, then put it in ``path``'s place.

    An existing ``path`` is replaced whole, only once ``write`` has succeeded; if ``write`` raises,
    ``path`` is left as it was. ``carry``: paths relative to ``path`` that move from the old folder
    into the new one (those the old folder has).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        make_readable(tmp)
        if not path.exists():
            os.rename(tmp, path)
            return path
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for item in map(Path, carry):
        if (old / item).exists():
            (path / item).parent.mkdir(parents=True, exist_ok=True)
            os.rename(old / item, path / item)
    shutil.rmtree(old, ignore_errors=True)
    return path


def make_readable(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes a plain write would: 0o777/0o666
    less the umask (temporary files and folders are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
