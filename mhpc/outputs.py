"""Output folders and files that are never ambiguous and never half-written.

* ``output_folder``: ``--out`` is always a folder. It is created, locked and a marker written before
  any work, so an unwritable path fails in a second, not after the fit. The marker (``MARKER``, JSON)
  records what belongs to the run: while it runs, the paths that were there before it (never touched);
  once it has finished, the files and folders it wrote. ``--overwrite`` removes exactly the earlier
  run's files and folders, nothing else (a notebook or a ``labels/`` folder added by the user stays),
  and is refused in a folder without a marker. A folder that holds a model is refused, except the
  model a fit or update wrote there itself (which the new one replaces atomically at the end).
* ``lock_folder``: one writer per folder (a model folder, an output folder): ``fcntl.flock`` on the
  folder itself. The kernel releases it when the process ends however it ends (a kill, a crash), so a
  dead writer never leaves a stale lock, and there is no pid file to trust or clean up; a second
  writer is refused at once (``LOCK_NB``), never queued.
* ``atomic_write_csv``: temp file in the same folder, fsync, rename. File names that are not valid
  UTF-8 round-trip through ``surrogateescape`` (the bytes written are the file name's bytes).
  ``save_npy``: a map written so that a full disk is reported as such. Both raise one MHPCError naming
  the file and the cause (``write_error``).
* ``output_names`` / ``output_stems``: one relative path per input image that mirrors its path under the
  inputs' common folder (with or without the image's extension), so maps and overlays never overwrite
  each other.
* ``safe_name``: run names from configs become a single safe path component.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mhpc.errors import MHPCError

MARKER = ".mhpc-run"
MARKER_FORMAT = "mhpc-run"
LOCK_FILE = ".mhpc-lock"  # only where a folder itself cannot be locked (some network file systems)


@contextmanager
def output_folder(path: str | os.PathLike, overwrite: bool = False, keep: Sequence[str] = (),
                  flag: str = "--out", keep_written: bool = False, model_file: str | None = None) -> Iterator[Path]:
    """A writable folder owned by this run (locked against a second writer), prepared before any work.

    ``overwrite``: the files and folders of the earlier mhpc run recorded in the marker are removed
    first; anything else in the folder stays. Names in ``keep`` (top-level names of that earlier run:
    an old model that the new one replaces atomically at the end, an ablation's finished runs) are
    not removed. ``model_file``: the model this command writes (fit, update), allowed in the folder
    when an earlier run wrote it; any other model file in the folder is refused.
    On failure (an error, Ctrl-C, SIGTERM) everything this run wrote is removed again, so nothing is
    left half-written. ``keep_written``: keep what was written (an ablation's finished runs, each
    complete on its own, which ``--resume`` reuses).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MHPCError(f"{flag} {out} exists and is not a folder; {flag} is always a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise MHPCError(f"{flag} {out} cannot be created: {parent} is a file")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MHPCError(f"{flag} {out} cannot be created: {exc.strerror or exc}") from None
    lock = None
    try:
        lock = lock_folder(out, f"{flag} {out}")
        foreign = _claim(out, overwrite, keep, flag, model_file)
    except BaseException:
        if created:
            _rmdir_quiet(out)
        if lock is not None:
            os.close(lock)
        raise
    try:
        yield out
    except BaseException:
        _release(out, foreign, True, None if keep_written else set(keep), created)
        raise
    else:
        _release(out, foreign, False, None, created)
    finally:
        os.close(lock)


def lock_folder(folder: str | os.PathLike, what: str) -> int:
    """An exclusive lock on ``folder`` held until the returned descriptor is closed; a second writer gets
    one MHPCError naming ``what``. See the module docstring for why ``flock``."""
    folder = Path(folder)
    try:
        return _flock(folder, os.O_RDONLY, what)
    except MHPCError:
        raise
    except OSError:  # some network file systems lock only files opened for writing: a lock file there
        pass
    try:
        return _flock(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, what)
    except OSError as exc:
        raise MHPCError(f"{what} cannot be locked: {exc.strerror or exc}") from None


def _flock(path: Path, flags: int, what: str) -> int:
    import fcntl

    fd = os.open(path, flags, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise MHPCError(f"{what} is being written by another mhpc process; wait for it to finish") from None
        raise
    return fd


def _tree(root: Path) -> tuple[set[str], set[str]]:
    """Every file and every folder under ``root`` as relative POSIX paths, the marker left out. Symbolic
    links count as files and are never followed, so nothing outside ``root`` is ever listed."""
    files: set[str] = set()
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                dirnames.remove(name)
                files.add(prefix + name)
            else:
                dirs.add(prefix + name)
        files.update(prefix + name for name in filenames)
    files.discard(MARKER)
    return files, dirs


def _read_marker(out: Path) -> dict | None:
    """The marker's record; None without a marker; ``{}`` for one that records no files (an older mhpc's)."""
    try:
        record = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("format") != MARKER_FORMAT or record.get("state") not in (
            "running", "done"):
        return {}
    return record


def _paths(record: dict, key: str) -> set[str]:
    values = record.get(key, [])
    return {p for p in values if isinstance(p, str)} if isinstance(values, list) else set()


def _owned(record: dict, files: set[str], dirs: set[str]) -> tuple[set[str], set[str]]:
    """What the earlier run owns of what is there now: the files and folders it recorded, or, for a run
    that was killed before it could record them, everything that was not there before it started."""
    if record.get("state") == "done":
        return _paths(record, "files") & files, _paths(record, "dirs") & dirs
    return files - _paths(record, "foreign_files"), dirs - _paths(record, "foreign_dirs")


def _top(path: str) -> str:
    return path.split("/", 1)[0]


def _claim(out: Path, overwrite: bool, keep: Sequence[str], flag: str,
           model_file: str | None) -> tuple[set[str], set[str]]:
    """Checks ``out`` and removes the earlier run's files (``overwrite``); writes the marker of a running run.
    Returns the paths that are not this run's (left alone now and on failure)."""
    files, dirs = _tree(out)
    record = _read_marker(out)
    if files or dirs or record is not None:
        if overwrite and record == {}:
            raise MHPCError(f"{flag} {out} was written by an earlier mhpc that did not record its files, so "
                            "--overwrite cannot tell them from yours; remove them yourself or choose a new folder")
        owned_files, owned_dirs = _owned(record, files, dirs) if record else (set(), set())
        for name in sorted(files):
            # The model this command replaces, or a killed save's temporary file, belong to the earlier run.
            ours = name in owned_files and (name == model_file or name.rsplit("/", 1)[-1].startswith(".tmp-"))
            if name.endswith(".safetensors") and not ours:
                raise MHPCError(f"{flag} {out} holds the model {out / name}; write the results to another folder")
        if not overwrite:
            raise MHPCError(f"{flag} {out} is not empty; choose a new folder or pass --overwrite to replace "
                            "the previous run's files")
        if record is None:
            raise MHPCError(f"{flag} {out} is not empty and was not written by mhpc; --overwrite only replaces "
                            "mhpc output folders")
        kept = set(keep)
        for name in owned_files:
            if _top(name) not in kept:
                _unlink(out / name)
        for name in sorted(owned_dirs, key=lambda d: d.count("/"), reverse=True):
            if _top(name) not in kept:
                _rmdir_quiet(out / name)  # a folder the user put files into stays, with those files
        files, dirs = _tree(out)
        foreign = (files - {f for f in owned_files if _top(f) in kept},
                   dirs - {d for d in owned_dirs if _top(d) in kept})
    else:
        foreign = (set(), set())
    _write_marker(out, {"state": "running", "pid": os.getpid(), "foreign_files": sorted(foreign[0]),
                        "foreign_dirs": sorted(foreign[1])})  # also the probe: an unwritable --out fails here
    return foreign


def _release(out: Path, foreign: tuple[set[str], set[str]], failed: bool, keep: set[str] | None,
             created: bool) -> None:
    """Records the run's files in the marker. After a failure, also removes what the run wrote, except the
    top-level names in ``keep`` (the earlier run's; None: keep everything written), and the marker and a
    folder it created once nothing of an mhpc run is left."""
    files, dirs = _tree(out)
    owned_files, owned_dirs = files - foreign[0], dirs - foreign[1]
    if failed:
        if keep is not None:
            for name in [f for f in owned_files if _top(f) not in keep]:
                _unlink(out / name)
            for name in sorted((d for d in owned_dirs if _top(d) not in keep), key=lambda d: d.count("/"),
                               reverse=True):
                _rmdir_quiet(out / name)
            files, dirs = _tree(out)
            owned_files, owned_dirs = files - foreign[0], dirs - foreign[1]
        if not owned_files and not owned_dirs:
            (out / MARKER).unlink(missing_ok=True)
            if created:
                _rmdir_quiet(out)
            return
    _write_marker(out, {"state": "done", "files": sorted(owned_files), "dirs": sorted(owned_dirs)})


def _write_marker(out: Path, record: dict) -> None:
    atomic_write_text(out / MARKER, json.dumps({"format": MARKER_FORMAT, **record}, indent=0) + "\n")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise write_error(path, exc, "cannot remove") from None


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def refuse_inputs_inside(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str,
                         flag: str = "--out", hint: str = "write the results to another folder") -> None:
    """An --out that holds one of the run's inputs (the model, an image, the benchmark) is refused, with or
    without --overwrite: a run never writes among, or clears, what it reads."""
    root = Path(os.path.abspath(out))
    for p in inputs:
        if root == Path(os.path.abspath(p)) or root in Path(os.path.abspath(p)).parents:
            raise MHPCError(f"{flag} {out} holds the {what} {p}; {hint}")


def probe_writable(folder: str | os.PathLike, what: str, suffix: str = "") -> None:
    """Creates and removes a temporary file in ``folder``: a folder that cannot be written fails before the
    work (``what``: the start of the one-line error; ``suffix``: the one whose stale files mhpc removes)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise MHPCError(f"{what}: {folder} is not writable ({exc.strerror or exc})") from None


def write_error(path: str | os.PathLike, exc: OSError, action: str = "cannot write") -> MHPCError:
    """One line naming the file and the cause (``No space left on device``, ``Read-only file system``)."""
    cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return MHPCError(f"{action} {path}: {cause}")


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """OSErrors inside become one MHPCError naming ``path`` and the cause."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None


class _Stream:
    """A plain writer: numpy writes a real file with ``tofile``, whose short write on a full disk says only
    "4096 requested and 4064 written"; through ``write`` the OSError carries errno (ENOSPC)."""

    def __init__(self, fh) -> None:
        self.write = fh.write


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` that fails with one MHPCError naming the file and the cause."""
    try:
        with open(path, "wb") as fh:
            np.save(_Stream(fh), array)
    except OSError as exc:
        raise write_error(path, exc) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8, surrogate-escaped bytes kept) to a temp file and renames it into place."""
    return _atomic(Path(path), lambda fh: fh.write(text))


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    def write(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)

    return _atomic(Path(path), write)


def _atomic(path: Path, write) -> Path:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_names(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Relative paths mirroring each input under the inputs' common folder (``good/000.png``); unique
    because the inputs are. Callers append their own suffix (``good/000.png.npy``)."""
    absolute = [Path(os.path.abspath(p)) for p in paths]
    if not absolute:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    names = [p.relative_to(root) for p in absolute]
    if len(set(names)) != len(names):  # the same file given twice
        seen: dict[Path, int] = {}
        out = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            out.append(n if seen[n] == 1 else n.with_name(f"{n.name}.{seen[n]}"))
        names = out
    return names


def output_stems(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """As ``output_names`` without the image's extension (``good/000``), for ``mhpc predict``'s
    ``maps/good/000.npy`` and ``overlays/good/000.png``. Two inputs of one folder with one stem
    (``a.png``, ``a.jpg``) keep their full names (``a.png``, ``a.jpg``); a clash left after that gets a
    counter, so the names stay unique."""
    names = output_names(paths)
    stems = [n.with_name(n.stem) for n in names]
    counts = Counter(stems)
    clash = {s for s, c in counts.items() if c > 1}
    stems = [n if s in clash else s for n, s in zip(names, stems)]
    seen: dict[Path, int] = {}
    unique = []
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        unique.append(s if seen[s] == 1 else s.with_name(f"{s.name}.{seen[s]}"))
    return unique


def with_suffix_added(name: Path, suffix: str) -> Path:
    return name.with_name(name.name + suffix)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_name(name: str) -> str:
    """One path component: unsafe characters become ``_``; no leading dots (``..``, hidden files)."""
    cleaned = _UNSAFE.sub("_", str(name)).lstrip(".")
    return cleaned[:120] or "run"
