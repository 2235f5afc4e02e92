"""Output folders and files that are never ambiguous and never half-written.

* ``prepare_out_dir``: ``--out`` is always a folder. It is created and a probe file written before any
  work, so an unwritable path fails in a second, not after the fit. A non-empty folder is refused
  unless ``overwrite``; then only a folder mhpc wrote itself (it holds ``MARKER``) is emptied. The
  marker is created exclusively, so two runs into one folder at once cannot both start.
* ``atomic_write_csv``: temp file in the same folder, fsync, rename. File names that are not valid
  UTF-8 round-trip through ``surrogateescape`` (the bytes written are the file name's bytes).
* ``output_names`` / ``output_stems``: one relative path per input image that mirrors its path under the
  inputs' common folder (with or without the image's extension), so maps and overlays never overwrite
  each other.
* ``safe_name``: run names from configs become a single safe path component.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mhpc.errors import MHPCError

MARKER = ".mhpc-run"


@contextmanager
def output_folder(path: str | os.PathLike, overwrite: bool = False, keep: Sequence[str] = (),
                  flag: str = "--out", keep_written: bool = False) -> Iterator[Path]:
    """An empty, writable folder owned by this run, prepared before any work.

    On failure (an error, Ctrl-C, SIGTERM) everything this run wrote is removed again, so nothing is
    left half-written; names in ``keep`` (an old model that the new one replaces atomically at the
    end) are neither cleared by ``overwrite`` nor removed on failure. ``keep_written``: keep what was
    written (an ablation's finished runs, each complete on its own, which ``--resume`` reuses).
    """
    out = Path(path)
    created = not out.exists()
    prepare_out_dir(out, overwrite, keep, flag)
    try:
        yield out
    except BaseException:
        for child in out.iterdir() if not keep_written else ():
            if child.name not in keep and child.name != MARKER:
                _remove(child)
        if not any(c.name != MARKER for c in out.iterdir()):  # kept files stay in an mhpc folder
            (out / MARKER).unlink(missing_ok=True)
            if created:
                out.rmdir()
        raise


def refuse_inputs_inside(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str,
                         flag: str = "--out") -> None:
    """An --out that holds an input (the model, an image) would be emptied by --overwrite: refuse it."""
    root = Path(os.path.abspath(out))
    for p in inputs:
        if root == Path(os.path.abspath(p)) or root in Path(os.path.abspath(p)).parents:
            raise MHPCError(f"{flag} {out} holds the {what} {p}; write the results to another folder")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_out_dir(path: str | os.PathLike, overwrite: bool = False, keep: Sequence[str] = (),
                    flag: str = "--out") -> Path:
    """Creates ``path`` as an empty, writable folder owned by this run, or raises one MHPCError."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MHPCError(f"{flag} {out} exists and is not a folder; {flag} is always a folder")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise MHPCError(f"{flag} {out} cannot be created: {parent} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MHPCError(f"{flag} {out} is not empty; choose a new folder or pass --overwrite to replace "
                            "the previous run's files")
        if not (out / MARKER).is_file():
            raise MHPCError(f"{flag} {out} is not empty and was not written by mhpc; --overwrite only replaces "
                            "mhpc output folders")
        for child in out.iterdir():
            if child.name not in keep:
                _remove(child)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        raise MHPCError(f"{flag} {out} is being written by another mhpc run") from None
    except OSError as exc:
        raise MHPCError(f"{flag} {out} cannot be created: {exc.strerror or exc}") from None
    try:
        os.write(fd, f"pid {os.getpid()}\n".encode())
        os.fsync(fd)
    except OSError as exc:
        raise MHPCError(f"{flag} {out} is not writable: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return out


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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
