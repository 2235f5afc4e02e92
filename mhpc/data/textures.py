"""A second, independent texture source: photographs from Extreme Tux Racer's terrain set.

The game's data ships in Debian's ``extremetuxracer-data`` package (GPL-2+, copyright the Extreme
Tux Racer team and Tuxracer contributors, see /usr/share/doc/extremetuxracer-data/copyright). Its
``terrains/`` folder holds 256x256 colour photographs of ground materials that tile seamlessly.
``mhpc setup-textures`` fetches the package with ``apt-get download`` (the registry a factory
mirror usually has), extracts only the few PNG files we use, checks their SHA-256 and places them
in a cache folder; nothing else of the package is kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mhpc.errors import MHPCError
from mhpc.keys import file_sha256

ETR_PACKAGE = "extremetuxracer-data"
ETR_TERRAINS = "usr/share/games/etr/terrains"
# category name -> (file in the package, SHA-256 of that file in extremetuxracer-data 0.8.2-1)
ETR_TEXTURES: dict[str, tuple[str, str]] = {
    "slate": ("pave01.png", "4729716ffe09cb7a8586bc3df219bfa046e34066b232a05fc351887312eabe49"),
    "rock": ("rock03.png", "71d1851b11997e234232572ed03312d08b53dc1c62c88a7cee2e2bb882c70a8a"),
    "leaves": ("floor01.png", "fd3219cbf5911cd194561184435e87cc456be2af5c167cbe917ef9f6d70a1a2f"),
}


def texture_dir() -> Path:
    """Where the extracted files live: ``$MHPC_TEXTURES`` or ``~/.cache/mhpc/textures``."""
    return Path(os.environ.get("MHPC_TEXTURES") or Path.home() / ".cache" / "mhpc" / "textures")


def texture_path(name: str) -> Path:
    """The verified PNG of an ETR category; a clear error naming the setup command if absent."""
    if name not in ETR_TEXTURES:
        raise MHPCError(f"unknown texture {name!r}; the Extreme Tux Racer ones are {list(ETR_TEXTURES)}")
    path = texture_dir() / ETR_TEXTURES[name][0]
    if not path.is_file():
        raise MHPCError(f"texture '{name}' needs {path}: run `mhpc setup-textures` "
                        f"(extracts it from Debian's {ETR_PACKAGE} package)")
    return path


def ensure_etr_textures(deb: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Extracts the ETR texture files into ``texture_dir()`` if missing; returns that folder.

    ``deb``: an already downloaded ``extremetuxracer-data_*.deb``; otherwise apt-get downloads it.
    """
    target = texture_dir()
    wanted = {file: digest for file, digest in ETR_TEXTURES.values()}
    if all((target / f).is_file() and file_sha256(target / f) == d for f, d in wanted.items()):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if deb is None:
            try:
                result = subprocess.run(["apt-get", "download", ETR_PACKAGE], cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                raise MHPCError(f"apt-get not found: download {ETR_PACKAGE}*.deb elsewhere and pass --deb") from None
            debs = list(Path(tmp).glob(f"{ETR_PACKAGE}_*.deb"))
            if result.returncode != 0 or not debs:
                raise MHPCError(f"could not download {ETR_PACKAGE} with apt-get ({result.stderr.strip()[-300:]}); "
                                "run `apt-get update` first or pass --deb")
            deb = debs[0]
        if not Path(deb).is_file():
            raise MHPCError(f"package file not found: {deb}")
        members = [f"./{ETR_TERRAINS}/{f}" for f in wanted]
        try:  # dpkg-deb is the trusted reader of .deb archives; tar then picks only our files
            fsys = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp, *members], input=fsys, capture_output=True, check=True)
        except FileNotFoundError:
            raise MHPCError("dpkg-deb and tar are needed to read the .deb package") from None
        except subprocess.CalledProcessError as exc:
            raise MHPCError(f"cannot extract the textures from {deb}: {exc.stderr.decode(errors='replace')[-300:]}") from None
        target.mkdir(parents=True, exist_ok=True)
        for file, digest in wanted.items():
            src = Path(tmp) / ETR_TERRAINS / file
            if file_sha256(src) != digest:
                raise MHPCError(f"{file} from {deb} has an unexpected SHA-256 (expected {digest})")
            partial = target / (file + ".partial")
            shutil.copyfile(src, partial)
            os.replace(partial, target / file)
    if not quiet:
        print(f"placed {len(wanted)} textures in {target}")
    return target
