"""Writing to disk: one atomic write (a file, a folder), one ownership record, one writer lock.

Every file or folder tunelab creates goes through this module, so the guarantees hold everywhere alike:

- **A file is replaced whole or not at all** (``atomic_file``): it is written to ``.NAME.tmp`` beside it, fsynced,
  and renamed over ``NAME`` with ``os.replace``; a crash leaves the old file.
- **A folder is replaced only when complete** (``atomic_folder``): it is built in ``.tmp-NAME`` beside it; every
  file and the folder are fsynced, then its seal (a checkpoint's ``COMPLETE``, an owned folder's record) is written
  and fsynced, then the old folder is moved to ``.old-NAME``, the new one renamed in, the parent fsynced, and only
  then the old one deleted. A crash leaves the old folder (or, killed between the two renames, ``.old-NAME``,
  which ``restore_replaced`` puts back).
- **tunelab deletes or overwrites only what it recorded creating, never by name.** A folder tunelab writes into
  holds a record, ``.tunelab.json``: ``{"format": 2, "by": "tunelab train", "entries": [...]}``, one top-level
  name per entry it created there (an entry that is a folder is owned with everything in it). A name is recorded
  *before* anything is written, so a crash mid-write leaves nothing unowned; an entry already there that the
  record does not name is the user's and is never written over (``ConfigError``). The temporaries of a recorded
  ``NAME`` are recognised exactly: ``.NAME.tmp``, ``.tmp-NAME``, ``.old-NAME``.
- **One writer at a time** (``acquire_lock``): ``.tunelab-lock`` holds the writing process's pid and host; a
  second live writer is refused, a dead one's lock is stale.

Folders written by an older tunelab carry other markers. They are still read as ownership, so an existing run can
be resumed or overwritten and an old cache reused as before, but only the new record is ever written (it replaces
the old marker the next time tunelab records an entry there):
- ``.tunelab-run.json`` (a run folder): the same ``entries`` list as the new record;
- ``.tunelab-eval``, ``.tunelab-merged``, ``.tunelab-converted`` (an eval output, a merged model, a converted model
  in the cache): that tunelab command wrote the whole folder, so every entry in it is tunelab's.
A data-cache entry from an older tunelab has no marker at all: it is read, but never replaced.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

RECORD = ".tunelab.json"
LOCK = ".tunelab-lock"
_FORMAT = 2
LEGACY_RUN_RECORD = ".tunelab-run.json"  # tunelab <= 0.x: a run folder's entries list, same shape as RECORD
LEGACY_WHOLE_FOLDER = (".tunelab-eval", ".tunelab-merged", ".tunelab-converted")  # "this command wrote it all"
_HOUSEKEEPING = frozenset({RECORD, f".{RECORD}.tmp", LOCK, f".{LOCK}.tmp", LEGACY_RUN_RECORD,
                           f".{LEGACY_RUN_RECORD}.tmp", *LEGACY_WHOLE_FOLDER})


# ---------------------------------------------------------------- reaching the disk


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (names created, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file's data, then every folder's names, deepest first (a folder is synced after what it holds)."""
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink():
            fsync_tree(path)
        elif path.is_file() and not path.is_symlink():
            fsync_file(path)
    fsync_dir(folder)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which races with
    other threads); Linux shows it in /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def ordinary_modes(path: Path) -> None:
    """Give a file (or every file in a folder) that its writer made private the mode an ordinary new file gets.

    safetensors writes 0600 whatever the umask, so a run's weights were unreadable to the teammates who can read
    every other file of the run; files are widened only as far as the user's umask allows."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        if file.stat().st_mode & 0o777 == 0o600:
            file.chmod(0o666 & ~_umask())


def remove(path: Path) -> None:
    """Delete a file, link or folder (callers decide ownership first: see ``owned_entries``)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------- one atomic write: a file, a folder


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield the temporary ``.NAME.tmp`` to write ``path``'s new content to (by any means: open, save_file, ...);
    on success it is fsynced and renamed over ``path``, on an error removed, and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        ordinary_modes(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)  # the atomic moment: before it, the old file is all there is
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """Write a whole file atomically. Inside a folder with an ownership record, use ``write_entry_text``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def atomic_folder(final: Path, seal: Callable[[Path], None] | None = None, shared: bool = False) -> Iterator[Path]:
    """Yield ``.tmp-NAME`` beside ``final`` to fill; on success it replaces ``final`` in one rename, once complete.

    ``seal(tmp)`` writes the folder's last file (a ``COMPLETE`` marker, an ownership record) after every other
    file and the folder's names are on disk, so a folder whose seal is there is whole even after a power loss.
    The caller answers for the names ``.tmp-NAME`` and ``.old-NAME`` being tunelab's (a recorded entry's
    temporaries, a folder tunelab owns whole): a leftover of either from a crash is removed. ``shared``: another
    process may build the same folder at once (a cache entry), so the temporaries get unique names instead
    (``.tmp-NAME-<random>``), and neither process ever deletes the other's.
    """
    if shared:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is a normal, shareable one
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))  # final is renamed onto it
    else:
        tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
        remove(tmp)
        tmp.mkdir(parents=True)
    moved_aside = False
    try:
        yield tmp
        ordinary_modes(tmp)
        # The OS writes back in any order: without these, a power loss could keep the seal and lose the data.
        fsync_tree(tmp)
        if seal is not None:
            seal(tmp)
            fsync_dir(tmp)
        if final.exists():  # the previous one stays whole until the new one is in place
            if not shared:
                remove(old)  # a leftover of a crash (a shared one is the empty folder made for it above)
            os.replace(final, old)
            moved_aside = True
        os.replace(tmp, final)  # the atomic moment: before it, the old folder is all there is
        fsync_dir(final.parent)
    except BaseException:
        remove(tmp)
        if (moved_aside or not shared) and old.is_dir() and not final.exists():  # put the old one back
            os.replace(old, final)
        if shared:
            remove(old)
        raise
    remove(old)


def restore_replaced(parent: Path, pattern: str, complete: Callable[[Path], bool]) -> None:
    """A hard kill between moving a folder aside (``.old-NAME``) and renaming its replacement in leaves no
    ``NAME``: put a complete old one back. ``pattern`` globs the names (``step-*``)."""
    for old in parent.glob(f".old-{pattern}"):
        final = parent / old.name[len(".old-"):]
        if not final.exists() and complete(old):
            os.replace(old, final)


# ---------------------------------------------------------------- the ownership record


def _check_name(name: str) -> None:
    if not name or "/" in name or os.sep in name or name.startswith(".") or name in _HOUSEKEEPING:
        raise ValueError(f"folder entry {name!r}: give one plain name (no '/', not starting with '.')")


def is_claimed(folder: Path) -> bool:
    """Whether ``folder`` holds tunelab's ownership record (or an older tunelab's marker)."""
    return any((folder / name).is_file() for name in (RECORD, LEGACY_RUN_RECORD, *LEGACY_WHOLE_FOLDER))


def owned_entries(folder: Path) -> set[str]:
    """The names tunelab recorded creating in ``folder`` (empty for a folder it never claimed)."""
    record_path = folder / RECORD if (folder / RECORD).is_file() else folder / LEGACY_RUN_RECORD
    if not record_path.is_file():
        if any((folder / name).is_file() for name in LEGACY_WHOLE_FOLDER):  # an older tunelab wrote it all
            return {p.name for p in folder.iterdir()} - _HOUSEKEEPING
        return set()
    try:
        record = read_json(record_path)
    except (OSError, ValueError):  # a damaged record: own nothing (deleting too little is the safe side)
        log.warning("%s is damaged; tunelab treats nothing in %s as its own", record_path, folder)
        return set()
    if not isinstance(record, dict) or not isinstance(record.get("entries"), list):
        return set()
    return {name for name in record["entries"] if isinstance(name, str)}


def _write_record(folder: Path, entries: set[str], by: str) -> None:
    write_json(folder / RECORD, {"format": _FORMAT, "by": by, "entries": sorted(entries)})
    for legacy in (LEGACY_RUN_RECORD, *LEGACY_WHOLE_FOLDER):  # written only in the new form from now on
        (folder / legacy).unlink(missing_ok=True)


def recorded_writer(folder: Path) -> str | None:
    """Who the folder's record says wrote it ('tunelab train', 'tunelab eval', ...); None without a readable one."""
    try:
        record = read_json(folder / RECORD)
    except (OSError, ValueError):
        record = None
    return record["by"] if isinstance(record, dict) and isinstance(record.get("by"), str) else None


def _by(folder: Path, default: str) -> str:
    """Who the folder's record says wrote it (kept when the record is rewritten)."""
    return recorded_writer(folder) or default


def claim(folder: Path, by: str) -> None:
    """Create ``folder`` if needed and start its ownership record (an existing one is kept, an older tunelab's
    marker carried over)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / RECORD).is_file():
        _write_record(folder, owned_entries(folder), by)


def _temporaries(name: str) -> tuple[str, str, str]:
    return f".{name}.tmp", f".tmp-{name}", f".old-{name}"


def _is_owned(entry: str, owned: set[str]) -> bool:
    if entry in owned or entry in _HOUSEKEEPING:
        return True
    return any(entry in _temporaries(name) for name in owned)


def own_entry(folder: Path, name: str, by: str = "tunelab") -> Path:
    """Record ``name`` as created by tunelab and return its path; refuse a same-named entry that is the user's."""
    _check_name(name)
    owned = owned_entries(folder)
    if name in owned:
        return folder / name
    path = folder / name
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} exists and was not created by tunelab; it is left alone. Move it, or choose "
                          "another output folder")
    folder.mkdir(parents=True, exist_ok=True)
    _write_record(folder, owned | {name}, _by(folder, by))
    return path


def write_entry_json(folder: Path, name: str, data: Any) -> Path:
    path = own_entry(folder, name)
    write_json(path, data)
    return path


def write_entry_text(folder: Path, name: str, text: str) -> Path:
    path = own_entry(folder, name)
    write_text(path, text)
    return path


def append_entry_line(folder: Path, name: str, line: str) -> None:
    """One line appended (metrics.jsonl). A kill mid-line leaves a damaged last line, which readers skip."""
    with open(own_entry(folder, name), "a") as handle:
        handle.write(line if line.endswith("\n") else line + "\n")


@contextmanager
def new_entry_folder(folder: Path, name: str) -> Iterator[Path]:
    """Build a folder entry in a temporary folder; it replaces ``name`` only once it is complete."""
    with atomic_folder(own_entry(folder, name)) as tmp:  # its temporaries are the recorded entry's
        yield tmp


@contextmanager
def owned_folder(final: Path, by: str) -> Iterator[Path]:
    """Build a folder that tunelab owns whole (a merged model, a cache entry) and put it in place once complete.

    ``final`` may be new, empty, or a folder whose entries are all recorded as tunelab's; anything else is the
    user's and is refused before anything is written. Its temporaries have unique names (another process may build
    the same cache entry at once). The record is written first into the temporary folder (so a leftover of a
    crash is provably tunelab's) and again as its seal, naming every entry.
    """
    check_replaceable(final)

    def seal(tmp: Path) -> None:
        _write_record(tmp, {p.name for p in tmp.iterdir()} - _HOUSEKEEPING, by)

    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final, seal, shared=True) as tmp:
        _write_record(tmp, set(), by)
        yield tmp


def check_replaceable(final: Path) -> None:
    """Refuse a folder that tunelab may not replace whole: a file, or a folder holding an entry it did not record
    (``owned_folder`` checks this; a caller may check first, before a long computation)."""
    if final.exists() and not final.is_dir():
        raise ConfigError(f"{final} is a file; give a folder")
    foreign = foreign_entries(final)
    if foreign:
        raise ConfigError(f"{final} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which "
                          "tunelab did not write; it is left alone (nothing there is touched). Give a new or empty "
                          "folder")


def remove_entry(folder: Path, name: str) -> None:
    """Delete a recorded entry and its temporaries; an entry tunelab did not record is never touched."""
    owned = owned_entries(folder)
    if name not in owned:
        return
    for entry in (name, *_temporaries(name)):
        remove(folder / entry)
    _write_record(folder, owned - {name}, _by(folder, "tunelab"))


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that tunelab did not record creating."""
    if not folder.is_dir():
        return []
    owned = owned_entries(folder)
    return sorted(p.name for p in folder.iterdir() if not _is_owned(p.name, owned))


def clear(folder: Path) -> None:
    """Remove what tunelab recorded creating in ``folder``, and only that: anything else is the user's."""
    owned = owned_entries(folder)
    for entry in folder.iterdir():
        if entry.name not in _HOUSEKEEPING and _is_owned(entry.name, owned):
            remove(entry)
    if is_claimed(folder):
        _write_record(folder, set(), _by(folder, "tunelab"))


def release(folder: Path, created_folder: bool) -> None:
    """Undo a claim that came to nothing: clear what tunelab wrote, and the folder itself if tunelab made it."""
    if not folder.is_dir():
        return
    clear(folder)
    if not foreign_entries(folder):
        for name in _HOUSEKEEPING:
            remove(folder / name)
        if created_folder and not any(folder.iterdir()):
            folder.rmdir()


# ---------------------------------------------------------------- one writer at a time


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def lock_owner(folder: Path) -> dict[str, Any] | None:
    """The live process holding ``folder``'s lock, or None (no lock, or its process is gone)."""
    try:
        owner = json.loads((folder / LOCK).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    if owner.get("host") == socket.gethostname() and not _pid_alive(owner["pid"]):
        return None  # a stale lock: its process died (killed, power loss)
    return owner if owner["pid"] != os.getpid() or owner.get("host") != socket.gethostname() else None


def refuse_a_live_writer(folder: Path) -> None:
    owner = lock_owner(folder) if folder.is_dir() else None
    if owner is not None:
        raise ConfigError(f"{folder} is being written by another tunelab process (pid {owner['pid']} on "
                          f"{owner.get('host')}); wait for it to finish, stop it, or choose another output.dir")


def acquire_lock(folder: Path) -> None:
    """Refuse to write a folder that another live process is writing; otherwise take the lock (pid and host).

    Checking for a live writer and writing the lock are two steps: two runs started at once on one folder could
    both pass the check. An exclusive flock on the folder itself (released when this function returns) makes the
    two steps one for every process on this host; the lock file, not the flock, says who writes for the run's
    whole life, so a process that dies leaves a lock that the next run sees is stale."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        refuse_a_live_writer(folder)
        write_json(folder / LOCK, {"pid": os.getpid(), "host": socket.gethostname()})
    finally:
        os.close(handle)  # closing the descriptor releases the flock


def release_lock(folder: Path) -> None:
    owner = read_json(folder / LOCK) if (folder / LOCK).is_file() else None
    if isinstance(owner, dict) and owner.get("pid") == os.getpid():
        (folder / LOCK).unlink(missing_ok=True)
