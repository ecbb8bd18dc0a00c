"""Atomic output directories: write into a temporary sibling, then rename into place.

A failure while writing leaves nothing behind; an existing directory is refused unless
``force`` is given, and then replaced only once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError


def check_out_dir(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output path unless ``force``; return it as a Path."""
    out = Path(path)
    if out.exists() and not force:
        raise UsageError(f"output directory {str(out)!r} already exists",
                         hint="pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {str(out)!r} exists and is not a directory", hint="choose another --out")
    parent = out.absolute().parent
    while not parent.exists():  # the nearest existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create output directory {str(out)!r}: {str(parent)!r} is not a directory",
                         hint="choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create output directory {str(out)!r}: {str(parent)!r} is not writable",
                         hint="choose another --out")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False):
    """Yield a temporary directory that becomes ``path`` when the block succeeds."""
    out = check_out_dir(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
