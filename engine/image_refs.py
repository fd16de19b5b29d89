"""Product photos uploaded with a spreadsheet: a zip (web app, API) or a folder (CLI) of images that
the sheet's ``image`` columns name.

An :class:`ImageLibrary` is a flat folder of checked photos. Cells find their photo by file name,
ignoring case and any folder part (``Photos/Sneaker.PNG`` finds ``sneaker.png``), so names must be
unique that way. Only ``.png``, ``.jpg``, ``.jpeg`` and ``.webp`` files are kept, and each must open
as an image; one that does not is remembered, so a row naming it is told "cannot be read as an image"
rather than "not uploaded".

Unpacking a zip refuses, before anything is written: member names with ``..``, absolute paths or
drive letters (zip-slip), more members than allowed, more bytes than allowed in all or in one file,
and members compressed suspiciously well (zip bombs). Sizes are counted again while decompressing,
because a zip's declared sizes can lie. Nothing outside ``dest`` is ever written.

The batch runner copies a library into ``<data_dir>/uploads/<batch_id>/images/`` when the batch
starts (:meth:`ImageLibrary.install`); that folder is the batch's ``input_dir``, where ``LoadImage``
reads, on the first run and on every resume.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engine.errors import SheetError

__all__ = ["IMAGE_EXTENSIONS", "ImageLimits", "ImageLibrary", "image_key", "workflow_image_names"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# What Finder, Explorer and friends put into zips next to the photos: never photos themselves.
_JUNK_PARTS = ("__MACOSX",)
_JUNK_NAMES = (".ds_store", "thumbs.db", "desktop.ini")
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Nodes whose ``image`` input names a file in the run's input folder.
_FILE_READING_NODES = ("LoadImage", "LoadImageMask")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on an upload of photos. Over a bound the whole upload is refused."""

    max_archive_bytes: int = 1024 * 1024 * 1024  # the zip itself
    max_members: int = 5_000  # every zip entry, folders and skipped files included
    max_images: int = 2_000
    max_total_bytes: int = 2 * 1024 * 1024 * 1024  # all members, decompressed
    max_file_bytes: int = 64 * 1024 * 1024  # one member, decompressed
    max_ratio: int = 100  # decompressed : compressed, per member once it is over 1 MiB
    max_pixels: int = 100_000_000  # one image's width x height


def image_key(name: str) -> str:
    """How a cell and a file are matched: the last path part, NFC-normalised and case-folded."""
    base = name.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return unicodedata.normalize("NFC", base).casefold()


def workflow_image_names(workflow: dict[str, Any]) -> list[str]:
    """The input-folder file names an API-format workflow reads (LoadImage / LoadImageMask), sorted."""
    names = set()
    for node in workflow.values():
        if isinstance(node, dict) and node.get("class_type") in _FILE_READING_NODES:
            value = (node.get("inputs") or {}).get("image")
            if isinstance(value, str):
                names.add(value)
    return sorted(names)


@dataclass
class ImageLibrary:
    """Checked photos in one flat folder. Build with :meth:`from_zip` or :meth:`from_folder`.

    ``files`` maps :func:`image_key` to the stored file name; ``unreadable`` maps keys of files that are
    not images to the reason, and ``unreadable_codes`` to the reason's code and values (a RowProblem's);
    ``skipped`` lists entries that were not photos at all (other extensions, folders, system files);
    ``digests`` maps stored names to their sha256.
    """

    folder: Path
    files: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    unreadable_codes: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------- building

    @classmethod
    def from_zip(
        cls, source: str | Path | bytes | IO[bytes], dest: str | Path, limits: ImageLimits | None = None
    ) -> "ImageLibrary":
        """Unpack the photos of a zip into ``dest`` (created; must be empty) and check each one.

        Raises :class:`SheetError` when the zip is refused (not a zip, zip-slip names, over a limit,
        duplicate names); ``dest`` is then left as it was.
        """
        limits = limits or ImageLimits()
        archive = _open_zip(source, limits)
        dest = Path(dest)
        with archive:
            photos, skipped = _plan_extraction(archive, limits)
            created = not dest.exists()
            if not created and any(dest.iterdir()):
                raise SheetError(f"cannot unpack the photos into '{dest}': the folder is not empty", kind="images")
            dest.mkdir(parents=True, exist_ok=True)
            try:
                library = cls(dest, skipped=skipped)
                total = 0
                for member, stored in photos:
                    total = _extract_member(archive, member, dest / stored, total, limits)
                    library._admit(dest / stored, limits)
                    if image_key(stored) in library.unreadable:
                        (dest / stored).unlink()  # only photos stay; the reason is remembered
            except BaseException:
                if created:
                    shutil.rmtree(dest, ignore_errors=True)
                else:  # it was empty: empty it again
                    for child in dest.iterdir():
                        if child.is_dir():
                            shutil.rmtree(child, ignore_errors=True)
                        else:
                            child.unlink()
                raise
        return library

    @classmethod
    def from_folder(cls, path: str | Path, limits: ImageLimits | None = None) -> "ImageLibrary":
        """The photos directly inside ``path`` (subfolders are not read), each checked.

        Raises :class:`SheetError` when the folder does not exist, holds too many photos, or two photos
        whose names differ only in case.
        """
        limits = limits or ImageLimits()
        folder = Path(path)
        if not folder.is_dir():
            raise SheetError(f"the photos folder '{folder}' does not exist or is not a folder", kind="images")
        library = cls(folder)
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        seen: dict[str, str] = {}
        for entry in entries:
            if not entry.is_file() or not _is_photo_name(entry.name):
                library.skipped.append(entry.name + ("/" if entry.is_dir() else ""))
                continue
            _refuse_duplicate(seen, entry.name, entry.name)
            if len(seen) > limits.max_images:
                raise SheetError(f"the photos folder holds more than {limits.max_images} images", kind="images",
                                 code="photos_too_many", limit=limits.max_images)
            library._admit(Path(entry.path), limits)
        return library

    def _admit(self, path: Path, limits: ImageLimits) -> None:
        """Check one stored file and record it as a photo, or as unreadable."""
        key = image_key(path.name)
        problem = _image_problem(path, limits)
        if problem is None:
            self.files[key] = path.name
            self.digests[path.name] = _sha256(path)
        else:
            code, self.unreadable[key], params = problem
            self.unreadable_codes[key] = (code, params)

    # ------------------------------------------------------------------------------------- looking up

    def names(self) -> list[str]:
        """The stored names of the readable photos, sorted."""
        return sorted(self.files.values(), key=str.casefold)

    def __len__(self) -> int:
        return len(self.files)

    def check(self, name: str) -> str | None:
        """Why a cell naming ``name`` cannot be used, or None when it names a readable photo."""
        problem = self.problem(name)
        return None if problem is None else problem[1]

    def problem(self, name: str) -> tuple[str, str, dict[str, Any]] | None:
        """:meth:`check` as (code, reason, params), the form of :class:`engine.sheets.RowProblem`."""
        if not isinstance(name, str) or not name.strip():
            return "photo_not_named", "no image file named", {}
        key = image_key(name)
        if key in self.files:
            return None
        if key in self.unreadable:
            code, params = self.unreadable_codes.get(key, ("photo_unreadable", {}))
            return (code, f"image '{name}' cannot be read as an image: {self.unreadable[key]}",
                    {"value": name, "error": self.unreadable[key], **params})
        if not key.endswith(IMAGE_EXTENSIONS):
            supported = ", ".join(IMAGE_EXTENSIONS)
            return ("photo_type_unsupported", f"image '{name}' is not a supported photo; supported: {supported}",
                    {"value": name, "supported": supported})
        shown = self.names()
        listed = ", ".join(shown[:20]) + (f" … ({len(shown) - 20} more)" if len(shown) > 20 else "")
        return ("photo_not_uploaded", f"image '{name}' is not in the uploaded photos; available: {listed or 'none'}",
                {"value": name, "available": listed or "-"})

    def resolve(self, name: str) -> str:
        """The stored file name a cell's ``name`` refers to; SheetError saying why when there is none."""
        problem = self.check(name)
        if problem is not None:
            raise SheetError(problem, kind="images", image=name)
        return self.files[image_key(name)]

    def path(self, name: str) -> Path:
        """The file a cell's ``name`` refers to (see :meth:`resolve`)."""
        return self.folder / self.resolve(name)

    @property
    def content_hash(self) -> str:
        """sha256 over the stored names and contents: the same photos hash the same, wherever they lie."""
        digest = hashlib.sha256()
        for stored in sorted(self.digests):
            digest.update(f"{stored}\0{self.digests[stored]}\n".encode())
        return digest.hexdigest()

    def missing(self) -> list[str]:
        """Stored names of readable photos whose files are no longer in the folder (a staging folder cleared
        after a day, while the check that unpacked it waited for Start)."""
        return sorted((name for name in self.files.values() if not (self.folder / name).is_file()), key=str.casefold)

    # ------------------------------------------------------------------------------------- installing

    def install(self, dest: str | Path) -> "ImageLibrary":
        """Copy the readable photos into ``dest`` (a batch's own folder) and return the library there.

        Files are written aside and the folder renamed into place, so ``dest`` holds all or nothing.
        Installing where the same photos already are (this library's folder, or an earlier install that
        was interrupted before its batch was recorded) returns the library there.
        """
        dest = Path(dest)
        if dest.exists() and dest.resolve() == self.folder.resolve():
            return self
        if dest.exists():
            there = ImageLibrary.from_folder(dest)
            if there.content_hash == self.content_hash:
                return there
            raise SheetError(f"cannot install the photos into '{dest}': other photos are there", kind="images")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            for stored in self.files.values():
                shutil.copyfile(self.folder / stored, staging / stored)
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return ImageLibrary(dest, dict(self.files), dict(self.unreadable), list(self.skipped), dict(self.digests),
                            dict(self.unreadable_codes))

    def describe(self) -> str:
        """One line for the user: how many photos, and what was left out."""
        parts = [f"{len(self.files)} photo(s)"]
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        if self.skipped:
            parts.append(f"{len(self.skipped)} other file(s) ignored")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------- zips


def _open_zip(source: str | Path | bytes | IO[bytes], limits: ImageLimits) -> zipfile.ZipFile:
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) > limits.max_archive_bytes:
                raise _archive_too_big(len(source), limits)
            return zipfile.ZipFile(io.BytesIO(bytes(source)))
        if isinstance(source, (str, Path)):
            size = Path(source).stat().st_size
            if size > limits.max_archive_bytes:
                raise _archive_too_big(size, limits)
            return zipfile.ZipFile(source)
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SheetError(f"the photos upload is not a valid zip archive: {exc}", kind="images",
                         code="photos_not_a_zip") from exc


def _archive_too_big(size: int, limits: ImageLimits) -> SheetError:
    size_mib, limit_mib = f"{size / 1048576:.1f}", f"{limits.max_archive_bytes / 1048576:.0f}"
    return SheetError(
        f"the photos zip is {size_mib} MiB; the limit is {limit_mib} MiB",
        kind="images", size=size, code="photos_zip_too_large", size_mib=size_mib, limit_mib=limit_mib,
    )


def _member_parts(name: str) -> list[str]:
    """The path parts of a member name; SheetError for names that could land outside the target."""
    text = name.replace("\\", "/")
    if _CONTROL.search(text):
        raise SheetError(f"the photos zip holds a member with control characters in its name: {name!r}",
                         kind="images", member=name, code="photos_unsafe_path")
    if text.startswith("/") or _DRIVE.match(text):
        raise SheetError(f"the photos zip holds an absolute path '{name}'; refused", kind="images", member=name,
                         code="photos_unsafe_path")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SheetError(f"the photos zip holds a path leading outside the folder ('{name}'); refused",
                         kind="images", member=name, code="photos_unsafe_path")
    return parts


def _is_photo_name(name: str) -> bool:
    lowered = name.casefold()
    if lowered in _JUNK_NAMES or name.startswith("._") or name.startswith("."):
        return False  # hidden files and macOS resource forks ("._x.png") are not photos
    return lowered.endswith(IMAGE_EXTENSIONS)


def _refuse_duplicate(seen: dict[str, str], stored: str, original: str) -> None:
    key = image_key(stored)
    if key in seen:
        raise SheetError(
            f"two photos are both named '{stored}' ignoring case and folders ('{seen[key]}' and '{original}'); "
            "rename one so each cell names one photo", kind="images", member=original,
            code="photos_duplicate_name", name=stored, first=seen[key], second=original,
        )
    seen[key] = original


def _member_name(member: zipfile.ZipInfo) -> str:
    """The member's name as its maker wrote it. Zips made on Chinese Windows store names in GBK without
    the UTF-8 flag, which Python reads as cp437 ("产品.png" becomes "▓·╞╖.png" and matches no cell);
    such a name is read again as UTF-8 (tools that omit the flag) or else GB18030."""
    name = member.filename
    if member.flag_bits & 0x800 or name.isascii():
        return name
    try:
        raw = name.encode("cp437")
    except UnicodeEncodeError:
        return name
    for encoding in ("utf-8", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return name


def _plan_extraction(archive: zipfile.ZipFile, limits: ImageLimits) -> tuple[list[tuple[zipfile.ZipInfo, str]], list[str]]:
    """The members to unpack with their flat stored names, after every name and declared-size check."""
    members = archive.infolist()
    if len(members) > limits.max_members:
        raise SheetError(f"the photos zip has {len(members)} entries; the limit is {limits.max_members}",
                         kind="images", code="photos_too_many_entries", count=len(members), limit=limits.max_members)
    declared = 0
    photos: list[tuple[zipfile.ZipInfo, str]] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for member in members:
        member.filename = _member_name(member)
        parts = _member_parts(member.filename)  # every name is checked, even those not unpacked
        mode = member.external_attr >> 16
        if member.is_dir() or not parts:
            continue
        if stat.S_ISLNK(mode) or any(p in _JUNK_PARTS for p in parts) or not _is_photo_name(parts[-1]):
            skipped.append(member.filename)
            continue
        if member.file_size > limits.max_file_bytes:
            size_mib, limit_mib = f"{member.file_size / 1048576:.1f}", f"{limits.max_file_bytes / 1048576:.0f}"
            raise SheetError(
                f"photo '{member.filename}' is {size_mib} MiB; the limit is {limit_mib} MiB", kind="images",
                member=member.filename, code="photo_too_large", size_mib=size_mib, limit_mib=limit_mib,
            )
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > 1024 * 1024 and ratio > limits.max_ratio:
            raise SheetError(
                f"photo '{member.filename}' is compressed {ratio:.0f}:1; the limit is {limits.max_ratio}:1 "
                "(possible zip bomb)", kind="images", member=member.filename,
                code="photo_compressed", ratio=f"{ratio:.0f}", limit=limits.max_ratio,
            )
        declared += member.file_size
        if declared > limits.max_total_bytes:
            raise SheetError(
                f"the photos zip unpacks to more than {limits.max_total_bytes / 1048576:.0f} MiB "
                "(possible zip bomb)", kind="images",
                code="photos_unpack_too_large", limit_mib=f"{limits.max_total_bytes / 1048576:.0f}",
            )
        _refuse_duplicate(seen, parts[-1], member.filename)
        photos.append((member, parts[-1]))
    if len(photos) > limits.max_images:
        raise SheetError(f"the photos zip holds {len(photos)} images; the limit is {limits.max_images}",
                         kind="images", code="photos_too_many", limit=limits.max_images)
    return photos, skipped


def _extract_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, total: int,
                    limits: ImageLimits) -> int:
    """Decompress one member to ``target``, counting real bytes against the limits; the new total."""
    written = 0
    try:
        with archive.open(member) as stream, open(target, "xb") as out:
            while chunk := stream.read(1 << 20):
                written += len(chunk)
                total += len(chunk)
                if written > max(member.file_size, 0) or written > limits.max_file_bytes:
                    raise SheetError(
                        f"photo '{member.filename}' unpacks to more bytes than the zip declares or the limit "
                        "allows (possible zip bomb)", kind="images", member=member.filename,
                        code="photo_unpacks_past_its_size",
                    )
                if total > limits.max_total_bytes:
                    raise SheetError(
                        f"the photos zip unpacks to more than {limits.max_total_bytes / 1048576:.0f} MiB "
                        "(possible zip bomb)", kind="images",
                        code="photos_unpack_too_large", limit_mib=f"{limits.max_total_bytes / 1048576:.0f}",
                    )
                out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # RuntimeError: encrypted member
        raise SheetError(f"photo '{member.filename}' cannot be unpacked: {exc}", kind="images",
                         member=member.filename, code="photo_unpack_failed") from exc
    return total


# ------------------------------------------------------------------------------------------- images


def _image_problem(path: Path, limits: ImageLimits) -> tuple[str, str, dict[str, Any]] | None:
    """Why ``path`` is not a usable photo as ``(code, reason, values)``, or None. Decodes it (cheaply for
    JPEG) to catch damaged files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as probe:
            width, height = probe.size
            # An animated photo of a few KB can hold hundreds of full-size frames, and LoadImage decodes
            # every one of them: the limit counts them all.
            frames = getattr(probe, "n_frames", 1)
            if frames * width * height > limits.max_pixels:
                shown = f"{width}x{height} is" if frames == 1 else f"{frames} frames of {width}x{height} are"
                reason = f"{shown} more than {limits.max_pixels:,} pixels"
                return ("photo_too_many_pixels", reason,
                        {"width": width, "height": height, "frames": frames, "max": limits.max_pixels})
            probe.verify()  # structure and checksums, without decoding
        with Image.open(path) as image:
            image.draft("RGB", (256, 256))  # JPEG decodes at reduced scale: fast, still reads every block
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return "photo_unreadable", str(exc).replace(str(path), path.name), {}
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports damage through all of these
        return "photo_unreadable", f"{type(exc).__name__}: {exc}".replace(str(path), path.name), {}
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
