"""On-disk cache of :class:`ProcessedData`, keyed by protocol and raw-file fingerprints.

Preprocessing is cheap for MovieLens but not for Taobao-sized data, and every
training run needs the same tensors. An entry lives in
``<cache_dir>/processed/<label>-<hash16>/`` where the hash covers the caller's
key (source, protocol options, code version) *and* the name, size and mtime of
every raw file, so editing or replacing a raw file invalidates the entry.

Entries are written to a temporary directory beside the final one and renamed
into place, so a crash never leaves a half-written entry under the final name;
an entry that still fails to load (disk trouble, manual edits) is rebuilt. A
staging folder left by a killed build is removed by a later build on the same
host once its process is gone (or by any build a day later). A cache that cannot
be written (a full or read-only disk) is a warning: the run goes on uncached.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from moe_mlora.data.processed import ProcessedData

log = logging.getLogger(__name__)

_KEY_FILE = "cache_key.json"


def default_cache_dir() -> Path:
    """``$MOE_MLORA_CACHE``, else ``$XDG_CACHE_HOME/moe_mlora``, else ``~/.cache/moe_mlora``."""
    explicit = os.environ.get("MOE_MLORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "moe_mlora"
    return Path.home() / ".cache" / "moe_mlora"


def usable_cache_dir(wanted: str | Path | None) -> Path:
    """The cache folder to use: ``wanted`` (or the default) when it can be written, else a
    temporary folder removed at exit, with a warning: a cache is never a reason to fail."""
    folder = Path(wanted).expanduser() if wanted else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkstemp(prefix=".write-test-", dir=folder)[1])
        probe.unlink()
        return folder
    except OSError as error:
        fallback = Path(tempfile.mkdtemp(prefix="moe_mlora-cache-"))
        atexit.register(shutil.rmtree, fallback, ignore_errors=True)
        log.warning(
            "cache folder %s cannot be written (%s); this run keeps no cache and generates "
            "its files in %s (set paths.cache_dir or $MOE_MLORA_CACHE to a writable folder)",
            folder, error.strerror or error, fallback,
        )  # fmt: skip
        return fallback


def file_fingerprint(paths: Iterable[Path]) -> list[dict]:
    """Name, size and mtime (ns) of each raw file: cheap, and changes when a file is replaced."""
    out = []
    for path in paths:
        stat = Path(path).stat()
        out.append({"name": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def cache_entry_dir(cache_dir: Path, key: dict, raw_files: list[Path], label: str = "") -> Path:
    """Where the entry for ``key`` and the current state of ``raw_files`` lives."""
    payload = {"key": key, "files": file_fingerprint(raw_files)}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    safe_label = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "data"
    return Path(cache_dir) / "processed" / f"{safe_label}-{digest}"


def write_atomically(target: Path, write: Callable[[Path], object]) -> bool:
    """Fill a fresh folder beside ``target`` with ``write(folder)``, then rename it to ``target``.

    A crash never leaves a half-written ``target``. If a concurrent writer got
    there first (``target`` is already a non-empty folder), theirs is kept and
    ours discarded. Returns whether ours was placed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target.name), dir=target.parent))
    try:
        write(staging)
        try:
            os.replace(staging, target)  # also replaces an empty folder
        except OSError:
            if not target.is_dir():
                raise
            return False
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


STAGING_MARK = ".tmp-"
STALE_AFTER_S = 24 * 3600  # a staging folder this old is abandoned, whoever made it


def host_tag() -> str:
    """This host's name with no ``-`` (the separator of :func:`staging_prefix`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]


def staging_prefix(name: str) -> str:
    """``.<name>.tmp-<host>-<pid>-``: who builds it, so a later build can tell it was killed."""
    return f".{name}{STAGING_MARK}{host_tag()}-{os.getpid()}-"


def remove_stale_staging(folder: Path) -> None:
    """Remove staging folders of builds that were killed: this host's dead pids, or a day old."""
    host = host_tag()
    for path in folder.glob(f".*{STAGING_MARK}*"):
        owner = path.name.rpartition(STAGING_MARK)[2].split("-")
        try:
            old = time.time() - path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        dead = (
            len(owner) >= 2 and owner[0] == host and owner[1].isdigit() and not alive(int(owner[1]))
        )
        if old or dead:
            log.info("removing %s, left by an interrupted cache build", path)
            shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def generated_dir(cache_dir: Path, prefix: str, params: dict) -> Path:
    """Where generated stand-in files for ``params`` live: ``<cache>/generated/<prefix>-<hash>``."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "generated" / f"{prefix}-{digest}"


def _try_load(entry: Path) -> ProcessedData | None:
    try:
        data = ProcessedData.load(entry)
    except Exception as err:  # any unreadable entry is rebuilt, never fatal
        log.warning(
            "cache entry %s is unreadable (%s: %s); rebuilding", entry, type(err).__name__, err
        )
        shutil.rmtree(entry, ignore_errors=True)
        return None
    log.info("loaded cached %s from %s", entry.name, entry)
    return data


def _store(entry: Path, data: ProcessedData, key: dict, raw_files: list[Path]) -> None:
    """Save the entry with its key record, atomically (see :func:`write_atomically`)."""

    def write(folder: Path) -> None:
        data.save(folder)
        record = {"key": key, "files": file_fingerprint(raw_files)}
        (folder / _KEY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))

    if write_atomically(entry, write):
        log.info("cached %s at %s", entry.name, entry)


def load_or_build(
    cache_dir: Path | None,
    key: dict,
    raw_files: list[Path],
    build: Callable[[], ProcessedData],
    label: str = "",
) -> ProcessedData:
    """Return the cached data for ``key`` and ``raw_files``, building and storing it on a miss.

    ``cache_dir=None`` disables caching (``build()`` every time). ``key`` must be
    JSON-serialisable (non-JSON values are stringified) and should include
    everything that changes the output except the raw files themselves.
    A failure to *write* the cache (read-only disk, ...) is logged and the
    freshly built data returned anyway.
    """
    if cache_dir is None:
        return build()
    entry = cache_entry_dir(Path(cache_dir), key, raw_files, label)
    if entry.is_dir():
        data = _try_load(entry)
        if data is not None:
            return data
    elif entry.exists():  # a stray file under the entry's name
        entry.unlink()
    data = build()
    try:
        _store(entry, data, key, raw_files)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("could not write cache entry %s (%s); going on uncached", entry, reason)
    return data
