"""Writing outputs so that a failure never leaves them half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


class OutputError(UserError, ValueError):
    """An output cannot be written where it is asked for."""


def require_writable(*paths: str | Path) -> None:
    """Check, before any work, that each output path can be created (its parent directory
    exists or can be made, and a file can be written there)."""
    for path in map(Path, paths):
        parent = path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-check-"):
                pass
        except OSError as err:
            raise OutputError(f"{path}: cannot write there ({err.strerror or err})") from None


PROC_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process's umask, read from /proc on Linux (setting it to read it back would race
    with other threads creating files); elsewhere set and restored at once."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the mode a plain ``open`` or
    ``mkdir`` would: 0o666 (files; 0o777 if executable) or 0o777 (directories) less the umask.
    ``tempfile.mkdtemp`` makes 0o700 directories and safetensors writes 0o600 files: private
    outputs that the user never asked for."""
    mask = current_umask()

    def fix(p: str, directory: bool) -> None:
        if os.path.islink(p):
            return
        executable = directory or os.stat(p).st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)

    fix(str(path), path.is_dir())
    for root, dirs, files in os.walk(path):
        for name in dirs:
            fix(os.path.join(root, name), True)
        for name in files:
            fix(os.path.join(root, name), False)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``path``; on success it replaces ``path`` whole (its
    modes following the umask), on failure it is deleted and ``path`` keeps what it had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    follow_umask(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once written it is renamed onto ``path`` (its
    mode following the umask), so a failure or a kill at any moment leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
