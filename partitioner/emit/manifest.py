"""The content hash of an artifact directory, and the check that its files are the ones written.

``manifest.json`` lists the artifact's files (``schedule.json``, the example inputs and
expected outputs, everything under ``segments/`` and ``replicas/``; other files beside them
are neither read nor hashed) with their sha256, and the *content hash*: the sha256 of that
listing as ``sha256sum`` prints it, sorted by path (docs/trust.md shows how to recompute
it). :func:`seal` writes the manifest and returns the hash; :func:`verify` refuses a
symlink, a file that is not regular, a missing, unlisted or changed file, a listing outside
the directory, and, with ``expect``, any other content hash. The manifest is not signed: it
detects damage and, checked against a hash from a trusted place (``run --expect``), replacement.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

from ..errors import ArtifactError, UsageError

__all__ = ["MANIFEST", "seal", "verify", "content_hash", "sha256_file", "check_relpath", "normalize_hash", "recorded_hash"]

MANIFEST = "manifest.json"
FORMAT = "partitioner.manifest/1"
TOP_FILES = ("schedule.json", "example_inputs.pt", "expected_outputs.pt")
TREES = ("segments", "replicas")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HEX = re.compile(r"[0-9a-f]{64}")
_HINT = ("write it again (partitioner compile ... --out DIR, or partitioner export), or copy the whole directory "
         "from its source")


def sha256_file(p: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(files: dict[str, str]) -> str:
    """The content hash of a listing ``{relative path: sha256}``: the sha256 of
    ``<sha256>  <path>`` lines sorted by path, as ``sha256sum`` prints them."""
    text = "".join(f"{files[rel]}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


def check_relpath(rel: object, root: Path, what: str) -> str:
    """``rel`` if it is a path inside the directory (``a/b.c``: no ``..``, no leading ``/``,
    plain names only), else :class:`ArtifactError` naming ``what``."""
    if not isinstance(rel, str) or not rel or not all(_PART.fullmatch(p) for p in rel.split("/")) \
            or any(p in (".", "..") for p in rel.split("/")):
        raise ArtifactError(f"artifact {root}: {what} refers to {str(rel)[:200]!r}, outside the artifact directory "
                            "or not a plain relative path", hint="the artifact was edited; " + _HINT)
    return rel


def _files(root: Path) -> list[str]:
    """Relative paths of the artifact's files; refuses symlinks and non-regular files."""
    out: list[str] = []

    def check(p: Path, rel: str, want_dir: bool = False) -> bool:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"artifact {root}: {rel} is a symbolic link; an artifact holds regular files only",
                                hint="copy the artifact with its files, not links (cp -rL), or " + _HINT)
        if want_dir and stat.S_ISDIR(st.st_mode):
            return True
        if want_dir or not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"artifact {root}: {rel} is not a regular file", hint=_HINT)
        if not all(_PART.fullmatch(x) for x in rel.split("/")):
            raise ArtifactError(f"artifact {root}: file name {rel!r} is not one partitioner writes", hint=_HINT)
        return True

    for name in TOP_FILES:
        if check(root / name, name):
            out.append(name)
    for tree in TREES:
        if not check(root / tree, tree + "/", want_dir=True):
            continue
        for here, dirs, files in os.walk(root / tree, followlinks=False):
            base = Path(here).relative_to(root).as_posix()
            for d in sorted(dirs):
                check(Path(here) / d, f"{base}/{d}", want_dir=True)
            for f in sorted(files):
                if check(Path(here) / f, f"{base}/{f}"):
                    out.append(f"{base}/{f}")
    return sorted(out)


def seal(root: str | Path) -> str:
    """Write ``root/manifest.json`` for the artifact's files as they are now; return the content hash."""
    root = Path(root)
    files = {rel: sha256_file(root / rel) for rel in _files(root)}
    h = content_hash(files)
    (root / MANIFEST).write_text(json.dumps({"format": FORMAT, "sha256": h, "files": files}, indent=1) + "\n")
    return h


def _read(root: Path) -> dict[str, str]:
    m = root / MANIFEST
    try:
        st = os.lstat(m)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {root} has no {MANIFEST} (not an artifact, or written by an older "
                            "partitioner)", hint=_HINT) from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"artifact {root}: {MANIFEST} is a symbolic link or not a regular file", hint=_HINT)
    try:
        data = json.loads(m.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ArtifactError(f"artifact {root}: {MANIFEST} is not valid JSON: {err}", hint=_HINT) from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict) \
            or not all(isinstance(v, str) and _HEX.fullmatch(v) for v in files.values()):
        raise ArtifactError(f"artifact {root}: {MANIFEST} is malformed (format {FORMAT} expected)", hint=_HINT)
    for rel in files:
        check_relpath(rel, root, MANIFEST)
        if rel not in TOP_FILES and rel.split("/")[0] not in TREES:
            raise ArtifactError(f"artifact {root}: {MANIFEST} lists {rel!r}, which is no artifact file", hint=_HINT)
    if data.get("sha256") != content_hash(files):
        raise ArtifactError(f"artifact {root}: {MANIFEST} does not agree with itself (its content hash is not "
                            "the hash of its listing)", hint="the manifest was edited; " + _HINT)
    return files


def recorded_hash(root: str | Path) -> str | None:
    """The content hash ``root/manifest.json`` records (not verified: for reporting what
    was just written), or None without a manifest."""
    try:
        data = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data.get("sha256") if isinstance(data, dict) else None


def normalize_hash(expect: str) -> str:
    """``expect`` as 64 lower-case hex digits, or :class:`UsageError`."""
    h = str(expect).strip().lower()
    if not _HEX.fullmatch(h):
        raise UsageError(f"expected content hash {str(expect)[:80]!r} is not a sha256 (64 hex digits)",
                         hint="pass the hash that `partitioner compile` printed")
    return h


def verify(root: str | Path, expect: str | None = None) -> tuple[str, dict[str, str]]:
    """Check the artifact's files against its manifest (see the module docstring).

    Returns
    -------
    (content hash, {relative path: sha256})

    Raises
    ------
    ArtifactError
        One message for the first problem found; with ``expect``, also when the content
        hash differs (the artifact is not the one expected).
    UsageError
        ``expect`` is not a sha256.
    """
    root = Path(root)
    want = normalize_hash(expect) if expect is not None else None
    files = _read(root)
    present = _files(root)
    for rel in sorted(files):
        if rel not in present:
            raise ArtifactError(f"artifact {root}: missing file {rel}", hint=_HINT)
    for rel in present:
        if rel not in files:
            raise ArtifactError(f"artifact {root}: file {rel} is not listed in {MANIFEST}",
                                hint=f"remove it (nothing was written there), or {_HINT}")
    for rel, digest in sorted(files.items()):
        if sha256_file(root / rel) != digest:
            raise ArtifactError(f"artifact {root}: {rel} was modified after it was written (its sha256 hash "
                                f"differs from {MANIFEST})", hint="restore the original file, or " + _HINT)
    h = content_hash(files)
    if want is not None and h != want:
        raise ArtifactError(f"artifact {root} has content hash {h}, not the expected {want}",
                            hint="this is not the artifact you expected: it was changed or replaced; get it again "
                                 "from its source")
    return h, files
