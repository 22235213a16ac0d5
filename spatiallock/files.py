"""File input and output for every part: JSON read within bounds, atomic writes (a reader never sees half a
file, a kill never leaves one), the one reader of image files, and the check that an output folder can be
written. Every refusal is a `SpatialLockError` naming the file or the option."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image

from spatiallock.errors import SpatialLockError


def _size(count: int) -> str:
    return f"{count / 2**30:g} GiB" if count >= 2**30 else f"{count / 2**20:g} MiB"


MAX_FILE_BYTES = 2**30  # a layout or COCO file larger than this is not read (COCO 2017's train file: 450 MB)


def read_json(
    path: str | Path, what: str = "JSON file", limit: int | None = None, bad_json: str = "malformed JSON"
) -> object:
    """The value of a JSON file, read only when it is a regular file of at most `limit` bytes (default
    `MAX_FILE_BYTES`): never a device, a pipe that would block, or a file that fills memory. `SpatialLockError`
    naming the file otherwise (`bad_json` begins the message of a file that is no JSON)."""
    path = Path(path)
    limit = MAX_FILE_BYTES if limit is None else limit
    try:  # non-blocking: opening a FIFO must not wait for a writer
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SpatialLockError(f"{path}: file not found") from None
    except OSError as err:
        raise SpatialLockError(f"{path}: cannot read: {err.strerror}") from None
    try:  # the kind of file is checked before a file object is made: `fdopen` refuses a folder's descriptor
        info = os.fstat(handle)
        if stat.S_ISDIR(info.st_mode):
            raise SpatialLockError(f"{path}: is a folder, expected a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise SpatialLockError(f"{path}: not a regular file")  # a device, a pipe or a socket
        if info.st_size > limit:
            raise SpatialLockError(f"{path}: larger than {_size(limit)}, too large for a {what}")
        stream = os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise
    with stream:
        try:
            raw = stream.read(limit + 1)
        except OSError as err:
            raise SpatialLockError(f"{path}: cannot read: {err.strerror}") from None
    if len(raw) > limit:  # grew while read
        raise SpatialLockError(f"{path}: larger than {_size(limit)}, too large for a {what}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpatialLockError(f"{path}: {bad_json}: {err}") from None
    except RecursionError:
        raise SpatialLockError(f"{path}: {bad_json}: nested too deeply") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise SpatialLockError(f"{path}: {bad_json}: {str(err).split(';')[0]}") from None


def _file_mode() -> int:
    """The mode `open` gives a new file (0o666 less the umask); `mkstemp`'s files are 0o600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def usual_modes(path: str | os.PathLike) -> None:
    """Give `path` and everything under it the modes `open` and `mkdir` would (0o666 / 0o777 less the umask):
    what `tempfile.mkdtemp` (0o700) and safetensors' writer (0o600) create is readable by its owner alone."""
    path = Path(path)
    files = _file_mode()
    folders = files | ((files & 0o444) >> 2)  # x wherever r
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, folders if item.is_dir() else files)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", **open_options) -> Iterator[IO]:
    """Open a new temporary file beside `path` and rename it onto `path` when the block ends without error.

    The temporary file gets an unpredictable name and is created exclusively (`tempfile.mkstemp`), so a link
    planted in the folder is never followed; the rename replaces a link at `path` itself instead of writing
    through it. On an error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode, **open_options) as handle:
            yield handle
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_output`."""
    with atomic_output(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON with sorted keys and fixed separators through a temporary file, so readers never see half a file."""
    with atomic_output(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        handle.write("\n")


def writable_folder(folder: str | os.PathLike, option: str) -> Path:
    """Check that `folder` is, or can be created as, a folder this process may write in; `SpatialLockError`
    naming `option` if not (a file, a path under a file, a broken link, a folder this user cannot write in).
    Nothing is created: a refused run leaves nothing behind."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise SpatialLockError(f"{option}: {folder} exists and is not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise SpatialLockError(f"{option}: {folder}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise SpatialLockError(f"{option}: {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpatialLockError(f"{option}: {folder}: {existing} is read-only for this user (no permission to write)")
    return folder


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG through `atomic_output`: a temporary file created exclusively beside it (a link planted there is
    never followed), renamed into place."""
    path = Path(path)
    with atomic_output(path, "wb") as stream:
        image.save(stream, format="PNG")
    return path


MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (about 89 million pixels)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at `path` as RGB, whatever its mode.

    Raises `OSError` or `ValueError` (the errors of an unreadable file) when it cannot be read, also when it
    declares more than `MAX_IMAGE_PIXELS` pixels: that is refused before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{image.width * image.height} pixels")
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        declared = re.search(r"\d+ pixels", str(err))  # PIL's own refusal at open names the count too
        size = f"{declared.group(0)}, more than" if declared else "more than"
        raise ValueError(f"{size} {MAX_IMAGE_PIXELS} pixels: too large to read") from None


def read_image_option(path: str | os.PathLike, name: str) -> Image.Image:
    """`read_rgb` for a command's input: one `SpatialLockError` naming option `name` when the file is missing or
    not an image."""
    from spatiallock.errors import first_line

    if not os.path.isfile(path):
        raise SpatialLockError(f"{name}: {path} not found")
    try:
        return read_rgb(path)
    except (OSError, ValueError) as err:
        raise SpatialLockError(f"{name}: {path} is not a readable image ({first_line(err)})") from None
