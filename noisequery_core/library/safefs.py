"""File access inside a library folder that never follows a link out of it, and OS errors as sentences.

Libraries are shared like model files, so everything inside one is untrusted: a column file,
``thumbs/`` or a single thumbnail may be a symbolic link to a file elsewhere, a FIFO, or a
folder where a file belongs. Every open, read, write, rename and delete of a file inside a
library goes through this module, which

* checks each folder between the library root and the file with ``lstat`` (no links, real
  folders), and
* opens the file itself with ``O_NOFOLLOW`` (an ``lstat`` first where the OS lacks it) and
  checks with ``fstat`` that it is a regular file.

The library root itself is the caller's choice (a name resolved inside noise_libraries, or a
path typed on the command line) and is trusted. The threat is a folder whose contents were
crafted, not a second process racing us, so check-then-open is enough between the folders.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from pathlib import Path
from typing import IO

from ..errors import LibraryError

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_EXTRA = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
TEMP_SUFFIX = ".nqtmp"
# Temp files this package writes: ".<target name>.<32 hex>.nqtmp". Only names of this shape
# are ever deleted by clean-up; anything else in a library folder is left alone.
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{32}" + re.escape(TEMP_SUFFIX) + r"$")
_LINK_ERRNOS = {errno.ELOOP, getattr(errno, "EMLINK", errno.ELOOP), getattr(errno, "EFTYPE", errno.ELOOP)}

_FIXES: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free space on it (or move the library to a bigger disk) and run again; "
    "entries committed so far are kept",
    errno.EROFS: "the file system is read-only: copy the library to a writable folder to add entries "
    "(searching a read-only library works)",
    errno.EACCES: "permission denied: give your user access to that file and its folder (or run as its owner)",
    errno.EPERM: "the operation is not permitted there: check the file's owner, permissions and attributes",
    errno.EISDIR: "a folder is in the way where a file belongs: delete or rename that folder",
    errno.ENOTDIR: "a file is in the way where a folder belongs: delete or rename that file",
    errno.ENAMETOOLONG: "the path is too long: use a shorter library name or a folder closer to the drive root",
    errno.EMFILE: "too many files are open: close other programs or raise the open-file limit (ulimit -n)",
    errno.ENFILE: "too many files are open system-wide: close other programs and run again",
    errno.EIO: "the disk reported an input/output error: check the drive, and restore the library from a backup",
    errno.ENOENT: "it does not exist (any more): check the path, or rebuild the library if a file was deleted",
}
if hasattr(errno, "EDQUOT"):
    _FIXES[errno.EDQUOT] = "your disk quota is used up: free space and run again; entries committed so far are kept"


def link_message(path: Path | str) -> str:
    return (
        f"{path} is a symbolic link. A NoiseQuery library never contains links, and one in a shared library "
        "could make NoiseQuery read or write files outside it; refusing to use it. Delete the link (or replace it "
        "with the real file from the library's source) and try again."
    )


def os_error(exc: OSError, path: Path | str, doing: str) -> LibraryError:
    """A LibraryError saying which file an OS error hit, what the OS said, and how to fix it."""
    if exc.errno in _LINK_ERRNOS:
        return LibraryError(link_message(path))
    fix = _FIXES.get(exc.errno or -1, "check that the disk is connected and the path is right, then run again")
    return LibraryError(f"Cannot {doing} {path}: {exc.strerror or exc}. Fix: {fix}.")


def _parts(rel: str) -> list[str]:
    # Relative names are built by this package (column names, "thumbs/<seed>.<fmt>", ...); the
    # check only guards against a bug turning a manifest value into a path.
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts) or os.path.isabs(rel):
        raise LibraryError(f"internal error: {rel!r} is not a plain relative name inside a library")
    return parts


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    return "a special file (FIFO, socket or device)"


def lstat(root: Path, rel: str) -> os.stat_result | None:
    """``lstat`` of ``root/rel`` after checking the folders on the way; None when it does not exist."""
    parts = _parts(rel)
    here = Path(root)
    for i, part in enumerate(parts):
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise os_error(exc, here, "inspect") from None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                raise LibraryError(link_message(here))
            raise LibraryError(f"{here} is {_kind(st)} where the library keeps a folder; delete or rename it.")
    return st


def check(root: Path, rel: str, want: str, *, missing_ok: bool = True) -> os.stat_result | None:
    """Refuse ``root/rel`` unless it is a real ``want`` ('file' or 'dir'), never a link; None if missing."""
    st = lstat(root, rel)
    path = Path(root) / rel
    if st is None:
        if missing_ok:
            return None
        raise LibraryError(f"{path} is missing; the library is damaged. Restore it from the library's source or rebuild.")
    if stat.S_ISLNK(st.st_mode):
        raise LibraryError(link_message(path))
    ok = stat.S_ISREG(st.st_mode) if want == "file" else stat.S_ISDIR(st.st_mode)
    if not ok:
        what = "a file" if want == "file" else "a folder"
        raise LibraryError(f"{path} is {_kind(st)} where the library keeps {what}; delete or rename it and try again.")
    return st


def ensure_dir(root: Path, rel: str) -> Path:
    """``root/rel`` as a real folder inside the library (created if missing, refused if a link)."""
    path = Path(root) / rel
    if check(root, rel, "dir") is None:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise os_error(exc, path, "create the folder") from None
        check(root, rel, "dir", missing_ok=False)
    return path


def open_fd(root: Path, rel: str, flags: int, *, doing: str, mode: int = 0o644) -> int:
    """``os.open`` of ``root/rel`` that refuses links, special files and folders on the way."""
    path = Path(root) / rel
    st = check(root, rel, "file")
    if st is None and not flags & os.O_CREAT:
        raise LibraryError(f"{path} is missing; the library is damaged. Restore it from the library's source or rebuild.")
    try:
        fd = os.open(path, flags | O_NOFOLLOW | _O_EXTRA, mode)
    except OSError as exc:
        raise os_error(exc, path, doing) from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise LibraryError(f"{path} is {_kind(fst)} where the library keeps a file; delete or rename it.")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(root: Path, rel: str, mode: str, *, doing: str) -> IO[bytes]:
    """A binary file object for ``root/rel``: mode 'rb', 'r+b' (existing file) or 'xb' (new file)."""
    flags = {"rb": os.O_RDONLY, "r+b": os.O_RDWR, "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL}[mode]
    fd = open_fd(root, rel, flags, doing=doing)
    links = os.fstat(fd).st_nlink
    if mode == "r+b" and links > 1:
        os.close(fd)
        # Appending to a hard-linked file would change the other name too, which may be a
        # file outside the library (or a backup the user meant to keep).
        raise LibraryError(
            f"{Path(root) / rel} has {links} hard links; writing to it would also change the other names, which may "
            "lie outside the library. Copy the library (`cp -r`, not a hard-link copy) and write to the copy."
        )
    return os.fdopen(fd, {"xb": "wb"}.get(mode, mode))


def read_bytes(root: Path, rel: str, *, limit: int, doing: str = "read") -> bytes:
    """The whole of ``root/rel`` (no links), refusing files larger than ``limit`` bytes."""
    path = Path(root) / rel
    fd = open_fd(root, rel, os.O_RDONLY, doing=doing)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise LibraryError(
                f"{path} is {size} bytes, more than the {limit} a file of its kind may hold; it is damaged or "
                "not NoiseQuery's. Restore it from the library's source."
            )
        chunks = []
        while True:
            try:
                chunk = os.read(fd, min(1 << 24, limit + 1))
            except OSError as exc:
                raise os_error(exc, path, doing) from None
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                raise LibraryError(f"{path} grew past {limit} bytes while being read; try again.")
        return b"".join(chunks)
    finally:
        os.close(fd)


def temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(16)}{TEMP_SUFFIX}"


def is_own_temp(name: str) -> bool:
    return bool(_TEMP_RE.match(name))


def write_all(fd: int, data: bytes | memoryview, path: Path | str, doing: str = "write") -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            raise os_error(exc, path, doing) from None
        view = view[n:]


def atomic_write(root: Path, rel: str, data: bytes, *, durable: bool = True) -> None:
    """Replace ``root/rel`` with ``data``: readers see the old or the new file, never a mix.

    A new temp file (exclusive, no-follow) in the same folder, fsync, ``os.replace`` (which
    replaces a link at the target rather than writing through it), then fsync the folder.
    """
    path = Path(root) / rel
    folder = path.parent
    rel_tmp = "/".join([*_parts(rel)[:-1], temp_name(path.name)])
    fd = open_fd(root, rel_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, doing="write", mode=0o644)
    tmp = Path(root) / rel_tmp
    try:
        try:
            write_all(fd, data, path)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise os_error(exc, path, "replace") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise os_error(exc, folder, "sync the folder") from None
    try:
        os.fsync(fd)
    except OSError as exc:
        raise os_error(exc, folder, "sync the folder") from None
    finally:
        os.close(fd)


def remove_own_temps(root: Path, rel_dir: str = "") -> int:
    """Delete temp files this package left in ``root/rel_dir`` ('' = the root itself): regular
    files of its own name shape only, never links, folders or anything else."""
    if rel_dir and check(root, rel_dir, "dir") is None:
        return 0
    folder = Path(root) / rel_dir if rel_dir else Path(root)
    removed = 0
    with os.scandir(folder) as it:
        for entry in it:
            if not is_own_temp(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise os_error(exc, entry.path, "delete the leftover temp file") from None
    return removed


def regular_file(root: Path, rel: str) -> Path | None:
    """``root/rel`` when it is a regular file reached without links; None otherwise (never raises for links)."""
    try:
        st = lstat(root, rel)
    except LibraryError:
        return None
    return Path(root) / rel if st is not None and stat.S_ISREG(st.st_mode) else None


__all__ = [
    "TEMP_SUFFIX",
    "atomic_write",
    "check",
    "ensure_dir",
    "fsync_dir",
    "is_own_temp",
    "link_message",
    "lstat",
    "open_fd",
    "open_file",
    "os_error",
    "read_bytes",
    "regular_file",
    "remove_own_temps",
    "temp_name",
    "write_all",
]
