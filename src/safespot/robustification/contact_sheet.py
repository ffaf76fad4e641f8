"""The contact sheet of a robustification: every ``ok`` file of a report as a labelled tile, the
original and the robustified image side by side, for a person to look at instead of the CSV.

- :func:`sheet_tiles`: the tiles of a report's rows, in input order: the original as the model
  sees it (read again and brought to the model's input size as the run did,
  :func:`safespot.data.image_files.read_file`) and the PNG written (read back), each labelled with
  the file's name relative to its input directory, the model's prediction (class names where the
  report has them; ``before -> after`` when the robustified image is classified otherwise) and the
  grey-box check's verdicts (``PGD: broken -> survives``), coloured green when the robustified
  image survives the check and red when it does not.
- :class:`Layout`: where each tile goes; every image is upscaled by an integer factor with
  nearest-neighbour (each pixel a ``scale x scale`` square), so 32 x 32 images are visible.
- :func:`write_contact_sheet`: ``contact_sheet.png``, or for more than :data:`PER_PAGE` tiles
  ``contact_sheet-page1.png``, ``contact_sheet-page2.png``, ...; when a name is taken, the next
  free group (``contact_sheet-1.png``, ``contact_sheet-1-page1.png``, ...), each name taken
  atomically (:func:`safespot.utils.files.write_first_free`): nothing is ever overwritten. The
  pages are rendered one at a time as they are written.

Text is drawn with PIL's built-in bitmap font (no font file needed), in ASCII.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from safespot.data.image_files import read_file
from safespot.data.images import decode_image
from safespot.utils.files import read_regular, write_first_free
from safespot.utils.logging import get_logger

log = get_logger("safespot.robustification")

#: tiles per page
PER_PAGE = 48
#: an image is shown at least this many pixels wide (upscaled by an integer factor)
SHOWN = 96
#: the widest a page grows by adding columns (a page of one column may be wider)
MAX_WIDTH = 1320
#: the narrowest page: room for the header
MIN_WIDTH = 480
PAD, GAP, BORDER, SPACING, LINE, LINES = 6, 4, 3, 8, 12, 3
HEADER = 2 * LINE + 2 * PAD
WHITE, INK, GREY = (255, 255, 255), (20, 20, 20), (190, 190, 190)
SURVIVES, BROKEN = (0, 140, 60), (200, 30, 30)


# --- the tiles --------------------------------------------------------------------------------
@dataclass
class Tile:
    """One ``ok`` file: its name, the original and robustified images (uint8 ``(H, W, 3)``;
    ``None`` when it can no longer be read), its label lines and whether the robustified image
    survives the check (the colour cue)."""

    name: str
    original: np.ndarray | None
    robustified: np.ndarray | None
    lines: tuple[str, str, str]
    survives: bool


def relative_name(record: dict[str, Any], out: Path) -> str:
    """The input's name relative to its input directory: the PNG's directory under ``out`` and
    the input's file name (``sub/dir/cat.jpg``)."""
    name = Path(str(record["input"])).name
    try:
        return (Path(str(record["output"])).relative_to(out).parent / name).as_posix()
    except ValueError:
        return name


def verdict(survives: Any) -> str:
    return "survives" if survives else "broken"


def labels(record: dict[str, Any], name: str, names: Sequence[str] | None = None) -> tuple[str, str, str]:
    """The three lines of a tile: the name (with its original size when it was resized), the
    prediction (the report's class name, else ``names``' or ``class <k>``; ``before -> after`` when
    the robustified image is classified otherwise) and the check's verdicts before and after."""

    def shown(index: Any, given: Any = None) -> str:
        if given:
            return str(given)
        known = names is not None and isinstance(index, int) and 0 <= index < len(names)
        return names[index] if known else f"class {index}"

    pred = shown(record["pred"], record.get("pred_name"))
    after = record.get("pred_robustified")
    if after is not None and after != record["pred"]:
        pred = f"{pred} -> {shown(after)}"
    resized = f" ({record['original_size']})" if record.get("resized") else ""
    check = f"PGD: {verdict(record['pgd_survives_before'])} -> {verdict(record['pgd_survives_after'])}"
    return f"{name}{resized}", f"pred: {pred}", check


def as_rgb(image: torch.Tensor) -> np.ndarray:
    """A uint8 ``(C, H, W)`` tensor (C = 1 or 3) as an ``(H, W, 3)`` array."""
    return image.expand(3, -1, -1).permute(1, 2, 0).numpy()


def original_image(record: dict[str, Any], channels: int, size: int, resize: str) -> np.ndarray | None:
    """The input as the model saw it (decoded, brought to ``size`` by ``resize``), or ``None``."""
    loaded = read_file(0, Path(str(record["input"])), channels, size, resize, 0)
    return None if loaded.image is None else as_rgb(loaded.image)


def robustified_image(record: dict[str, Any], channels: int, size: int) -> np.ndarray | None:
    """The PNG written, read back, or ``None`` when it can no longer be read as an image of ``size``."""
    try:
        image = decode_image(read_regular(Path(str(record["output"]))), channels)
    except Exception:  # gone, replaced or unreadable since: the tile shows a grey square
        return None
    return as_rgb(image) if tuple(image.shape[-2:]) == (size, size) else None


def sheet_tiles(
    records: list[dict[str, Any]], out: Path, meta: dict[str, Any], names: Sequence[str] | None = None
) -> Iterator[Tile]:
    """A :class:`Tile` for every ``ok`` record, in order; ``meta`` is the report's (``input_size``
    and ``resize``: the original is brought to the model's input as the run did), ``names`` the
    class names, if any."""
    channels, size = int(meta["input_size"][0]), int(meta["input_size"][-1])
    for record in records:
        if record["status"] != "ok":
            continue
        name = relative_name(record, out)
        yield Tile(
            name,
            original_image(record, channels, size, str(meta["resize"])),
            robustified_image(record, channels, size),
            labels(record, name, names),
            bool(record["pgd_survives_after"]),
        )


# --- the layout -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where the tiles of a sheet go: images of ``size`` pixels upscaled ``scale`` times, tiles in
    ``columns`` columns. A tile is ``[original | robustified]`` above three label lines, framed in
    its colour."""

    size: int
    scale: int
    columns: int

    @classmethod
    def of(cls, size: int, tiles: int) -> Layout:
        """The layout of pages of at most ``tiles`` tiles of ``size``-pixel images."""
        scale = max(1, SHOWN // size)
        stride = 2 * size * scale + GAP + 2 * PAD + SPACING
        return cls(size, scale, max(1, min(tiles, (MAX_WIDTH - SPACING) // stride)))

    @property
    def side(self) -> int:
        return self.size * self.scale

    @property
    def tile(self) -> tuple[int, int]:
        """A tile's width and height."""
        return 2 * self.side + GAP + 2 * PAD, PAD + self.side + GAP + LINES * LINE + PAD

    def origin(self, i: int) -> tuple[int, int]:
        """The top left corner of tile ``i`` of a page."""
        width, height = self.tile
        row, column = divmod(i, self.columns)
        return SPACING + column * (width + SPACING), HEADER + SPACING + row * (height + SPACING)

    def images(self, i: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The top left corners of tile ``i``'s original and robustified images."""
        x, y = self.origin(i)
        return (x + PAD, y + PAD), (x + PAD + self.side + GAP, y + PAD)

    def page_size(self, tiles: int) -> tuple[int, int]:
        """The width and height of a page of ``tiles`` tiles."""
        width, height = self.tile
        rows = math.ceil(tiles / self.columns)
        return max(MIN_WIDTH, SPACING + self.columns * (width + SPACING)), HEADER + SPACING + rows * (height + SPACING)


# --- drawing ----------------------------------------------------------------------------------
@functools.cache
def font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font (loaded once)."""
    return ImageFont.load_default_imagefont()


def fit(text: str, width: int, face: ImageFont.ImageFont) -> str:
    """``text`` in ASCII, cut in the middle (``...``) until it fits ``width`` pixels: a long path
    keeps its start (the first directories) and, twice as long, its end (the file name)."""
    text = text.encode("ascii", "replace").decode()
    if face.getlength(text) <= width:
        return text
    for kept in range(len(text) - 1, 0, -1):
        head = kept // 3
        cut = text[:head] + "..." + text[len(text) - (kept - head) :]
        if face.getlength(cut) <= width:
            return cut
    return "..."


def upscaled(image: np.ndarray | None, layout: Layout) -> Image.Image:
    """An image upscaled ``layout.scale`` times (nearest neighbour), or a grey square."""
    if image is None:
        return Image.new("RGB", (layout.side, layout.side), GREY)
    return Image.fromarray(image).resize((layout.side, layout.side), Image.Resampling.NEAREST)


def draw_tile(page: Image.Image, draw: ImageDraw.ImageDraw, layout: Layout, i: int, tile: Tile) -> None:
    """Tile ``i`` of ``page``: its frame in its colour, both images and its three lines."""
    (x, y), (width, height) = layout.origin(i), layout.tile
    colour = SURVIVES if tile.survives else BROKEN
    draw.rectangle((x, y, x + width - 1, y + height - 1), outline=colour, width=BORDER)
    original, robustified = layout.images(i)
    page.paste(upscaled(tile.original, layout), original)
    page.paste(upscaled(tile.robustified, layout), robustified)
    face, top = font(), y + PAD + layout.side + GAP
    for k, (line, ink) in enumerate(zip(tile.lines, (INK, INK, colour), strict=True)):
        draw.text((x + PAD, top + k * LINE), fit(line, width - 2 * PAD, face), fill=ink, font=face)


def render_page(tiles: list[Tile], layout: Layout, header: tuple[str, str]) -> bytes:
    """One page of ``tiles`` under its two header lines, as PNG bytes."""
    page = Image.new("RGB", layout.page_size(len(tiles)), WHITE)
    draw = ImageDraw.Draw(page)
    face = font()
    for k, line in enumerate(header):
        draw.text((SPACING, PAD + k * LINE), fit(line, page.width - 2 * SPACING, face), fill=INK, font=face)
    for i, tile in enumerate(tiles):
        draw_tile(page, draw, layout, i, tile)
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    return buffer.getvalue()


class Pages(Sequence[bytes]):
    """The pages of a sheet as PNG bytes, each rendered when it is asked for (so that a sheet of
    many pages is never held whole)."""

    def __init__(
        self, records: list[dict[str, Any]], out: Path, meta: dict[str, Any], names: Sequence[str] | None,
        per_page: int,
    ) -> None:  # fmt: skip
        self.out, self.meta, self.names, self.per_page = out, meta, names, per_page
        self.ok = [r for r in records if r["status"] == "ok"]
        self.layout = Layout.of(int(meta["input_size"][-1]), min(len(self.ok), per_page))
        self.check = str(meta.get("check", "PGD")).split(",")[0]

    def __len__(self) -> int:
        return math.ceil(len(self.ok) / self.per_page)

    def __getitem__(self, k: int) -> bytes:  # type: ignore[override]
        if not 0 <= k < len(self):
            raise IndexError(k)
        part = self.ok[k * self.per_page : (k + 1) * self.per_page]
        header = (
            f"page {k + 1}/{len(self)}: {len(part)} of {len(self.ok)} images; left: original (model input), "
            "right: robustified",
            f"{self.check} check before -> after: green frame survives after, red broken after",
        )
        return render_page(list(sheet_tiles(part, self.out, self.meta, self.names)), self.layout, header)


def sheet_names(pages: int) -> Iterator[list[str]]:
    """The names of a sheet of ``pages`` pages: ``contact_sheet.png`` (one page) or
    ``contact_sheet-page<p>.png``, then ``contact_sheet-1*``, ``contact_sheet-2*``, ..."""
    for k in range(100_000):
        base = "contact_sheet" if k == 0 else f"contact_sheet-{k}"
        yield [f"{base}.png"] if pages == 1 else [f"{base}-page{p}.png" for p in range(1, pages + 1)]


def write_contact_sheet(
    out: Path, records: list[dict[str, Any]], meta: dict[str, Any], names: Sequence[str] | None = None,
    per_page: int = PER_PAGE,
) -> list[Path]:  # fmt: skip
    """The contact sheet of ``records`` (a report's rows and meta; ``names``: the class names, if
    any) in ``out``, under the first free group of :func:`sheet_names` (each name taken
    atomically, nothing overwritten); ``[]`` when no file is ``ok``."""
    pages = Pages(records, out, meta, names, per_page)
    if not len(pages):
        return []
    log.info("drawing the contact sheet: %d files on %d pages", len(pages.ok), len(pages))
    return list(write_first_free(out, sheet_names(len(pages)), pages))
