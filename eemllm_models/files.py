"""Writing files so that a crash or a bad input never leaves a half-written result."""

from __future__ import annotations

import json
import math
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


def strict_json(value):
    """``value`` (dicts, lists, numbers) with every NaN, a metric that does not apply, as ``None``."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def atomic_write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as strict JSON (NaN as ``null``, which every JSON reader accepts) atomically."""
    return atomic_write_text(path, json.dumps(strict_json(value), indent=1, allow_nan=False) + "\n")


MARKER = ".eemllm"
"""The file eemllm writes into every folder it writes whole (pruned models, reports, checkpoints): only a
folder holding it is ever replaced, so an overwrite never deletes a folder of someone else's files."""


class ForeignFolderError(FileExistsError):
    """A folder to be replaced was not written by eemllm (it has no :data:`MARKER`); nothing was changed.

    ``path`` is the folder; the message says to choose another output folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} was not written by eemllm (it has no {MARKER} marker file), so it is not "
                         "replaced and nothing in it was changed; choose another output folder, or empty or "
                         "remove this one yourself")


def written_by_eemllm(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder eemllm wrote with :func:`atomic_write_dir` (it holds :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def replaceable(path: str | os.PathLike) -> bool:
    """True when :func:`atomic_write_dir` may replace ``path``: absent, an empty folder, or a folder eemllm wrote."""
    path = Path(path)
    if not path.exists():
        return True
    return path.is_dir() and (written_by_eemllm(path) or not any(path.iterdir()))


def _write_marker(folder: Path) -> None:
    try:
        from importlib.metadata import version

        who = f"eemllm {version('eemllm')}"
    except Exception:  # an uninstalled checkout still marks its folders
        who = "eemllm"
    (folder / MARKER).write_text(f"written by {who}; eemllm replaces this folder only when asked to overwrite it\n")


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None],
                     carry: Sequence[str | os.PathLike] = ()) -> Path:
    """Call ``write(tmp)`` on a temporary folder next to ``path``, then put it in ``path``'s place.

    The new folder gets the :data:`MARKER` file. An existing ``path`` is replaced whole, only once
    ``write`` has succeeded, and only when eemllm wrote it (it holds the marker) or it is empty: any
    other existing folder or file raises :class:`ForeignFolderError` before anything is written, and is left untouched.
    If ``write`` raises, ``path`` is left as it was. ``carry``: paths relative to ``path`` that move from
    the old folder into the new one (those the old folder has).
    """
    path = Path(path)
    if not replaceable(path):
        raise ForeignFolderError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        _write_marker(tmp)
        make_readable(tmp)
        if not path.exists():
            os.rename(tmp, path)
            return path
        if not replaceable(path):  # appeared or changed while writing
            raise ForeignFolderError(path)
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
