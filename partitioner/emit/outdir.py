"""Output directories and files: checked before any work, locked while written, replaced atomically.

A directory is written into a temporary sibling and renamed into place when complete, so
a failure leaves nothing behind. Every output directory carries the marker file
:data:`MARKER`; ``force`` replaces an existing directory only when it holds the marker or
is empty, never a directory of the user's own files. A run holds an exclusive ``flock`` on
``.OUT.lock`` while it writes ``OUT``, so a second run to the same ``OUT`` stops at once; the
next run removes the temporary directories a killed run left behind. Typical use::

    with OutDir(out, force) as od:          # refused here (before any work) if it cannot be written
        result = long_computation()
        with od.writing() as tmp:           # files go to tmp; renamed to ``out`` on success
            (tmp / "plan.json").write_text(...)

:func:`check_out_file` does the up-front check for an output file (``--stats``, ``run --out``).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError

__all__ = ["MARKER", "OutDir", "atomic_dir", "check_out_file", "is_our_output"]

#: The marker file of every output directory (constant content, so that hashing a directory
#: that holds it stays deterministic).
MARKER = ".partitioner-output"
_MARKER_TEXT = '{"format": "partitioner.output/1", "note": "written by partitioner; --force may replace it"}\n'

try:  # POSIX; elsewhere no lock is taken (the rest still holds)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def is_our_output(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds an earlier output of ours (the marker file)."""
    return (Path(path) / MARKER).is_file()


def _same_or_inside(a: Path, b: Path) -> bool:
    """Whether ``b`` is ``a`` or inside it (both resolved)."""
    return a == b or a in b.parents


def _existing_parent(path: Path, option: str) -> Path:
    """The nearest existing ancestor of ``path``; it must be a directory."""
    anc = path.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"cannot create {option} {str(path)!r}: {str(anc)!r} is not a directory",
                         hint=f"give {option} a path in a directory")
    return anc


def _check(out: Path, force: bool, protect: tuple[Path, ...], option: str) -> None:
    if out.is_symlink():
        raise UsageError(f"{option} {str(out)!r} is a symbolic link", hint=f"pass the real path as {option}")
    real = out.resolve()
    for p in (Path.cwd(), *protect):
        if _same_or_inside(real, p.resolve()):
            what = "the current directory" if p == Path.cwd() else repr(str(p))
            raise UsageError(f"{option} {str(out)!r} is {what} or holds it; replacing it would delete it",
                             hint=f"choose another {option}, e.g. a new subdirectory")
    if not out.exists():
        _existing_parent(out, option)
        return
    if not out.is_dir():
        raise UsageError(f"output path {str(out)!r} exists and is not a directory", hint=f"choose another {option}")
    if not force:
        raise UsageError(f"output directory {str(out)!r} already exists",
                         hint=f"pass --force to replace it, or choose another {option}")
    if not is_our_output(out) and any(out.iterdir()):
        raise UsageError(f"{str(out)!r} is not an output of partitioner (it has no {MARKER} file): --force "
                         "replaces only an earlier output or an empty directory",
                         hint=f"choose another {option}, or move the directory away yourself")


class OutDir:
    """An output directory about to be written (see the module docstring).

    Parameters
    ----------
    path : path-like
        The directory to write.
    force : bool
        Replace an existing earlier output (or an empty directory).
    protect : tuple of path-like
        Directories the output must be neither equal to nor hold (besides the current one),
        e.g. the artifact an export reads.
    option : str
        The option's name for messages (``--out``).

    Raises
    ------
    UsageError
        From :meth:`open`: the path cannot be used or written, or another run writes it.
    """

    def __init__(self, path: str | os.PathLike, force: bool = False, *, protect: tuple = (), option: str = "--out"):
        self.path = Path(path)
        self.force = force
        self.protect = tuple(Path(p) for p in protect)
        self.option = option
        self._fd: int | None = None
        self._made: list[Path] = []
        self._abs = Path(os.path.abspath(self.path))  # "." and ".." resolved: names of the lock and temporaries
        self._lock = self._abs.with_name(f".{self._abs.name}.lock")

    def __enter__(self) -> "OutDir":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    def open(self) -> None:
        """Check the path, create its missing parents, take the lock, remove stale temporaries."""
        _check(self.path, self.force, self.protect, self.option)
        missing = [p for p in [self._abs.parent, *self._abs.parent.parents] if not p.exists()]
        try:
            for p in reversed(missing):
                p.mkdir()
                self._made.append(p)
            self._take_lock()
            _check(self.path, self.force, self.protect, self.option)  # again, now that no one else writes it
        except OSError as err:
            self.close(failed=True)
            raise UsageError(f"cannot write {self.option} {str(self.path)!r}: {err.strerror or err}"
                             + (f" ({err.filename})" if err.filename else ""),
                             hint=f"choose a writable {self.option}") from None
        except BaseException:
            self.close(failed=True)
            raise
        self._clean_stale()

    def _take_lock(self) -> None:
        while True:
            fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:  # pragma: no cover
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise UsageError(f"another partitioner run (pid {holder or '?'}) is writing {str(self.path)!r}",
                                 hint=f"wait for it to finish, or choose another {self.option}") from None
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self._lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _temporaries(self) -> list[Path]:
        parent, name = self._abs.parent, self._abs.name
        return [p for p in parent.glob(f".{name}.*") if p.is_dir() and not p.is_symlink()
                and (p.name.endswith(".tmp") or p.name.startswith(f".{name}.old-")) and is_our_output(p)]

    def _clean_stale(self) -> None:
        """Remove temporaries of earlier runs to this path that were killed (we hold the lock:
        no run that could still be writing one is alive)."""
        for p in self._temporaries():
            shutil.rmtree(p, ignore_errors=True)

    @contextmanager
    def writing(self):
        """Yield a temporary directory (with the marker) that replaces the output when the block succeeds."""
        out = self._abs
        _check(self.path, self.force, self.protect, self.option)  # again: it may have appeared meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output is an ordinary directory
            (tmp / MARKER).write_text(_MARKER_TEXT)
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        self._made.clear()  # the parents hold the output now
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def close(self, failed: bool = False) -> None:
        """Release the lock (and remove its file); after a failure, remove the parents we created."""
        if self._fd is not None:
            try:
                os.unlink(self._lock)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if failed:
            for p in reversed(self._made):
                try:
                    p.rmdir()
                except OSError:
                    break
        self._made.clear()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, *, protect: tuple = (), option: str = "--out"):
    """Yield a temporary directory that becomes ``path`` when the block succeeds (an
    :class:`OutDir` opened and written at once)."""
    with OutDir(path, force, protect=protect, option=option) as od, od.writing() as tmp:
        yield tmp


def check_out_file(path: str | os.PathLike | None, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a directory, a path
    under a file, or a place where no file can be created (tried, not guessed)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {str(p)!r} is a directory", hint=f"give {option} a file path")
    if p.exists() and not p.is_file():
        raise UsageError(f"{option} {str(p)!r} is not a regular file", hint=f"give {option} a file path")
    anc = _existing_parent(p, option)
    try:
        if p.exists():
            with open(p, "ab"):
                pass
        else:
            with tempfile.TemporaryFile(dir=anc, prefix=".partitioner-probe-"):
                pass
    except OSError as err:
        raise UsageError(f"cannot write {option} {str(p)!r}: {err.strerror or err}",
                         hint=f"give {option} a writable path") from None
