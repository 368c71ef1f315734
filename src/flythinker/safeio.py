"""The one place where user-facing files are checked, locked, read and written, so that the rule "a one-line error
naming what and where, nothing half-written, nothing acknowledged lost, no silent mixing" holds for every verb.

Owns: output-target checks (`check_output_file`, `check_output_dir`: never a device, FIFO or directory where a file
is expected), fail-fast exclusive locks (`exclusive_lock`, filelock), text reading with file/line errors
(`read_text`, `iter_lines`: bad UTF-8, lone surrogates), atomic writes (`atomic_write_text`), stable fingerprints of
settings (`fingerprint`), and `finite` (a number check for configs). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .utils import UserError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def special_kind(path: str | os.PathLike) -> str:
    """What a non-regular path is, in words ("a pipe (FIFO)", "a character device", ...)."""
    try:
        return _kind(os.stat(path).st_mode)
    except OSError:
        return "unreadable"


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """`path` as a writable output file: absent, or an existing regular file. Devices, pipes, sockets and
    directories are refused before anything is opened (a resume must never read /dev/stdout or /dev/full)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        parent = p.parent if str(p.parent) else Path(".")
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{what} {p}: {parent} is not a directory") from None
        return p
    except OSError as e:
        raise UserError(f"{what} {p}: cannot inspect ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {p}: is {_kind(st.st_mode)}; pass a regular file path")
    return p


def check_output_dir(path: str | os.PathLike, what: str = "out_dir") -> Path:
    """`path` as an output directory: absent or an existing directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p}: exists and is not a directory")
    return p


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `<target>.lock` (or `<dir>/.flythinker.lock` for a directory) for the block; fail at once with a
    one-line error when another process holds it, instead of interleaving two writers."""
    from filelock import FileLock, Timeout

    t = Path(target)
    lock_path = t / ".flythinker.lock" if t.is_dir() else t.with_name(t.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{what} {t} is in use by another flythinker process (lock {lock_path}); wait for it to "
                        f"finish or use another path") from None
    try:
        yield
    finally:
        lock.release()


def _check_surrogates(text: str, where: str) -> None:
    """A lone surrogate (JSON "\\ud800") is valid JSON but not text: it cannot be encoded for a tokenizer or a
    file later, so it is refused where it was read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: contains an invalid character (a lone surrogate such as \\ud800 at offset "
                        f"{e.start}); fix the text") from None


def decode_line(raw: bytes, path: str | os.PathLike, lineno: int) -> str:
    """One line of a UTF-8 text file; a UserError naming file and line for a non-UTF-8 byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
            from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The whole of a (small) UTF-8 text file: config files. A clear error for a missing, non-regular, binary or
    non-UTF-8 file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} not found")
    if not p.is_file():
        raise UserError(f"{p}: {what} is not a regular file")
    data = p.read_bytes()
    if b"\x00" in data:
        raise UserError(f"{p}: {what} is binary, not text")
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        decode_line(raw, p, lineno)
    return data.decode("utf-8")


def check_json_text(obj: Any, where: str) -> None:
    """Refuse lone surrogates anywhere in a parsed JSON value."""
    if isinstance(obj, str):
        _check_surrogates(obj, where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_surrogates(str(k), where)
            check_json_text(v, where)
    elif isinstance(obj, list):
        for v in obj:
            check_json_text(v, where)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename, so a reader (or a kill)
    never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes_via(path: str | os.PathLike, write: Any) -> None:
    """Atomic write through a callback that writes a file at the path it is given (e.g. matplotlib's savefig):
    a temporary name in the same directory, then a rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=p.suffix, dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fingerprint(obj: Any, n: int = 16) -> str:
    """A stable short hash of a JSON-able value (sorted keys): what a resume compares to refuse mixing runs."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """sha256 (first n hex digits) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise UserError(f"{where}: must be a finite number; got {value!r}")
    return value


__all__ = ["atomic_write_bytes_via", "atomic_write_text", "check_json_text", "special_kind", "check_output_dir", "check_output_file", "decode_line",
           "exclusive_lock", "file_digest", "fingerprint", "finite", "read_text"]
