"""Generations of a local stage folder: a rebuild never changes the files its readers have open.

On a local (or shared-filesystem) store, `<root>/<stage>/<fp16>` is a relative
symbolic link to a *generation*, `<root>/_generations/<stage>/<fp16>.<8 hex>`,
which holds the files and `_COMPLETE.json`; users and tools read
`<root>/<stage>/<fp16>/` as always, and `<root>/<stage>/` lists only stage
folders. The first build of a stage folder writes a new generation and links
it at once (nothing was committed there), and works through the link. A
rebuild of a *committed* stage folder (`--force`, `--from`, `--only`) writes a
new generation beside it, and its commit swaps the link (a new link renamed
over the old one: atomic), so a reader sees the old commit or the new one,
never a mix and never a cleared folder. A folder of a store written before
generations (a real folder, not a link) is read in place; a rebuild moves it
aside as a generation of its own.

A reader resolves the link once and leases the generation it got
(`pipeline.engine.leases`); the process building a generation leases it until
its commit. `collect` removes every generation of a stage folder that is not
the linked one and that no live process holds; it runs when a generation is
made, committed, or opened by a reader. Limits: a reader of a pre-generation
folder holds a path that a rebuild re-links, so it is safe only for files it
had already opened; on a filesystem without locks old generations are kept.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from pipeline.engine import leases

_building: dict[str, Path] = {}  # stage folder link -> the lease this process holds on the generation it builds


def _fsync(path: Path) -> None:
    """Make a file's data, or a folder's entries (a rename, a new file), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path, files: list[str]) -> None:
    """fsync every listed file, then every folder holding one (deepest first), so the data is on disk before the
    marker that vouches for it."""
    folders = {folder}
    for name in files:
        _fsync(folder / name)
        folders.update(p for p in (folder / name).parents if p.is_relative_to(folder))
    for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _fsync(d)


class Generations:
    """The generations of the stage folders of one local store root."""

    def __init__(self, base: str):
        self.base = Path(base)

    def link(self, stage: str, fp16: str) -> Path:
        return self.base / stage / fp16

    def folder(self, stage: str, name: str) -> Path:
        """A generation by name; a name without a dot is a pre-generation stage folder itself."""
        return self.base / "_generations" / stage / name if "." in name else self.base / stage / name

    def lease(self, stage: str, name: str) -> Path:
        return self.base / "_locks" / "leases" / stage / f"{name}.lease"

    def current(self, stage: str, fp16: str) -> Path | None:
        """The folder `<root>/<stage>/<fp16>` is now: the generation it links to, the folder itself (a store
        written before generations), or None."""
        link = self.link(stage, fp16)
        try:
            target = Path(os.path.normpath(link.parent / os.readlink(link)))
        except FileNotFoundError:
            return None
        except OSError:  # EINVAL: not a link
            return link if link.is_dir() else None
        return target if target.is_dir() else None

    def open(self, stage: str, fp16: str, name: str | None = None) -> Path | None:
        """The current generation (or the one named), leased by this process; None if there is none."""
        while True:
            folder = self.folder(stage, name) if name else self.current(stage, fp16)
            if folder is None:
                return None
            if not leases.hold(self.lease(stage, folder.name)):
                continue  # removed while we waited for its lease
            if folder.is_dir():
                return folder
            lease = self.lease(stage, folder.name)  # we made a fresh lease file for a folder removed meanwhile
            leases.release(lease)
            leases.remove_unless_held(lease, lambda: True)
            if name:
                return None

    def new(self, stage: str, fp16: str) -> Path:
        """A new, empty generation, leased by this process (its builder) before it exists; a build of the same
        folder this process had started and not committed is abandoned (its lease given back)."""
        folder = self.folder(stage, f"{fp16}.{secrets.token_hex(4)}")
        self.built(stage, fp16)
        _building[str(self.link(stage, fp16))] = lease = self.lease(stage, folder.name)
        leases.hold(lease)
        folder.mkdir(parents=True)
        return folder

    def resume(self, stage: str, fp16: str, folder: Path) -> None:
        """This process builds the incomplete generation `folder` on (it holds it as its builder)."""
        self.built(stage, fp16)
        _building[str(self.link(stage, fp16))] = lease = self.lease(stage, folder.name)
        leases.hold(lease)

    def built(self, stage: str, fp16: str) -> None:
        """The build of this folder by this process is over (committed or abandoned): its builder lease goes."""
        lease = _building.pop(str(self.link(stage, fp16)), None)
        if lease is not None:
            leases.release(lease)

    def point(self, stage: str, fp16: str, folder: Path) -> None:
        """Make `<root>/<stage>/<fp16>` the generation `folder`: a new link renamed over the old one."""
        link = self.link(stage, fp16)
        if link.is_dir() and not link.is_symlink():  # a pre-generation folder: moved aside as a generation
            aside = self.folder(stage, f"{fp16}.{secrets.token_hex(4)}")
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.rename(link, aside)
        tmp = link.parent / f".{fp16}.{os.getpid()}.link"
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(folder, link.parent), tmp)  # relative: the store can be moved or mounted elsewhere
        os.replace(tmp, link)
        _fsync(link.parent)

    def commit(self, stage: str, fp16: str, folder: Path, marker: str, data: bytes) -> None:
        """Write the marker into the generation `folder` (temp, fsync, rename, fsync the folder: its data files are
        synced already), make it the stage folder if it is not, and remove what is no longer needed."""
        tmp = folder / f".{marker}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / marker)
        _fsync(folder)
        if folder != self.link(stage, fp16) and self.current(stage, fp16) != folder:  # a rebuild: swap the link;
            self.point(stage, fp16, folder)  # new readers get it, earlier ones keep theirs
        self.built(stage, fp16)  # current now: safe from `collect` without its builder's lease
        self.collect(stage, fp16)

    def collect(self, stage: str, fp16: str) -> list[str]:
        """Remove the generations of `<stage>/<fp16>` that are not current and that no process holds."""
        def remove(folder: Path) -> bool:
            # asked again under the exclusive lease: a builder relinks only while it holds its generation's lease
            if self.current(stage, fp16) == folder:
                return False
            shutil.rmtree(folder, ignore_errors=True)
            return True

        removed = []
        for folder in sorted((self.base / "_generations" / stage).glob(f"{fp16}.*")):
            if folder.is_symlink() or not folder.is_dir() or self.current(stage, fp16) == folder:
                continue
            if leases.remove_unless_held(self.lease(stage, folder.name), lambda folder=folder: remove(folder)):
                removed.append(str(folder))
        return removed
