"""Download Kenney's 1-Bit Pack and turn it into a small dataset of 16x16 sprites.

The pack (CC0, https://kenney.nl/assets/1-bit-pack) contains a tilesheet,
`colored-transparent_packed.png`: 49 x 22 tiles of 16x16 pixels, each drawn in
one colour on a transparent background. This script cuts the sheet into tiles,
paints the transparent background black, keeps the "focused" subset (tiles
whose drawing covers 15% to 50% of the pixels) and saves one compressed file:

    data/sprites-colored.npz   images (N,16,16,3) uint8, tile_index, is_val, density
    data/sprites-colored.png   a preview of every sprite, to look at

Two ways to run it:

    python download.py                                   # fetch the pack from kenney.nl
    python download.py --from PATH/TO/kenney_1-bit-pack.zip   # or a file you downloaded
    python download.py --from PATH/TO/colored-transparent_packed.png

Options: --variant mono (white sprites), --all (keep all non-empty tiles),
--out DIR (default: data), --force (rebuild even when the output exists).
The archive is read in memory; nothing from it is extracted to disk.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit at once (130), no traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import argparse
import errno
import hashlib
import http.client
import io
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

PACK_PAGE = "https://kenney.nl/assets/1-bit-pack"
PACK_URL = ("https://kenney.nl/media/pages/assets/1-bit-pack/"
            "aa867a1f37-1677578516/kenney_1-bit-pack.zip")
PACK_SHA256 = "129a0e74e1dc9091a769d5118be5c88780484c7a3771ee33ac9ef0df02583a9a"  # 657,579 bytes
SHEET_NAME = "colored-transparent_packed.png"
FALLBACK = (f"download it by hand from {PACK_PAGE} and run: "
            "python download.py --from PATH/TO/kenney_1-bit-pack.zip (the sheet inside it, "
            f"{SHEET_NAME}, works too); then, in the activated .venv (. .venv/bin/activate), "
            "start the training again: python vae.py --epochs 200")

DOWNLOAD_TIMEOUT = 30           # seconds without an answer before giving up
MAX_BYTES = 50 * 1024 * 1024    # the pack is 0.66 MB; refuse anything absurdly large
MAX_MEMBER_BYTES = 10 * 1024 * 1024   # the sheet inside it is 6 KB; a zip member may inflate no further
TILE = 16                       # sprites are 16x16 pixels, packed with no spacing
ALPHA_MIN = 128                 # alpha >= this counts as foreground
DENSITY_MIN, DENSITY_MAX = 0.15, 0.50   # the focused subset (inclusive bounds)
VAL_EVERY = 10                  # every 10th tile of the sheet goes to validation
FORMAT_VERSION = 1              # bump when the npz layout changes
PREVIEW_COLUMNS, PREVIEW_SCALE = 32, 2
PALETTE_SHOWN = 16


class DataError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def default_path(variant="colored", keep_all=False, out="data"):
    """Where the dataset for these options lives, e.g. data/sprites-colored.npz."""
    return Path(out) / f"sprites-{variant}{'-all' if keep_all else ''}.npz"


# --- Getting the tilesheet bytes --------------------------------------------

def fetch_url(url, timeout=DOWNLOAD_TIMEOUT):
    """Return the body of `url` as bytes, held in memory (tests replace this)."""
    # Some servers turn away Python's default User-Agent, so name ourselves.
    request = urllib.request.Request(url, headers={"User-Agent": "sprite-dataset/1"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise OSError(f"response larger than {MAX_BYTES} bytes")
    return data


def download_pack(log=print):
    """Download the pack zip and check it is exactly the file we expect."""
    log(f"downloading {PACK_URL}")
    try:
        data = fetch_url(PACK_URL)
    except urllib.error.HTTPError as exc:        # before URLError: it is a subclass
        raise DataError(f"could not download the pack (HTTP {exc.code} {exc.reason}); "
                        f"{FALLBACK}") from None
    except urllib.error.URLError as exc:        # offline, DNS failure, refused...
        raise DataError(f"could not download the pack ({exc.reason}); {FALLBACK}") from None
    except (OSError, http.client.HTTPException) as exc:   # timeout, cut connection
        raise DataError(f"could not download the pack ({exc or type(exc).__name__}); "
                        f"{FALLBACK}") from None
    # A download we cannot verify is refused: Kenney may have re-published the
    # pack under this URL, or something in between may have altered it. A file
    # the user picks by hand (--from) is trusted instead, since they chose it.
    digest = sha256_hex(data)
    if digest != PACK_SHA256:
        raise DataError(f"could not download the pack (sha256 {digest[:16]}... does not "
                        f"match the expected {PACK_SHA256[:16]}...); {FALLBACK}")
    return data


def sheet_from_zip(zip_bytes, origin="the zip"):
    """Return the bytes of the tilesheet inside a pack zip, without extracting it.

    The sheet is found by its file name alone, wherever the folder layout puts
    it. Member paths are never used as paths on disk, so a malicious archive
    cannot write outside the output folder.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
            found = []  # every member of the sheet's name: the first one that is a sheet wins
            for info in archive.infolist():
                # Zips made on Windows sometimes use backslashes as separators.
                name = PurePosixPath(info.filename.replace("\\", "/")).name
                if name == SHEET_NAME and not info.is_dir():
                    found.append(read_member(archive, info, origin))
                    if is_sheet(found[-1]):
                        return found[-1]
            if found:  # none is a sheet: the first one's error
                return found[0]
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as exc:
        raise DataError(f"{origin} is not a readable zip ({exc}); "
                        f"download the pack again from {PACK_PAGE}") from None
    raise DataError(f"{origin} does not contain {SHEET_NAME}; is it the 1-Bit Pack? "
                    f"It is on {PACK_PAGE}")


def is_sheet(png_bytes):
    try:
        return load_sheet(png_bytes) is not None
    except DataError:
        return False


def read_member(archive, info, origin):
    """The bytes of one zip member, refused early if it inflates past
    MAX_MEMBER_BYTES: a tiny zip can hold a member of gigabytes (a "zip bomb").
    The size in the header is checked first, but the header can lie, so the
    member is also read in bounded chunks and never past the limit."""
    too_big = DataError(f"{SHEET_NAME} in {origin} inflates to more than {MAX_MEMBER_BYTES // 2**20} MB (the real "
                        f"sheet is 6 KB); this is not the 1-Bit Pack, download it again from {PACK_PAGE}")
    if info.file_size > MAX_MEMBER_BYTES:
        raise too_big
    chunks, size = [], 0
    with archive.open(info) as member:
        while chunk := member.read(1 << 20):
            size += len(chunk)
            if size > MAX_MEMBER_BYTES:
                raise too_big
            chunks.append(chunk)
    return b"".join(chunks)


def read_source(path, log=print):
    """Return (sheet bytes, description) from the user's pack zip or sheet PNG."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; pass the pack zip "
                        f"or {SHEET_NAME} from {PACK_PAGE}")
    if path.stat().st_size > MAX_BYTES:
        raise DataError(f"{path} is too large to be the pack; "
                        f"pass the pack zip or {SHEET_NAME}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    # Zip files start with "PK"; a damaged zip may not pass is_zipfile(), so the
    # magic bytes or the suffix decide, and ZipFile then reports the damage.
    if data[:2] == b"PK" or path.suffix.lower() == ".zip":
        digest = sha256_hex(data)
        # Not enforced: Kenney re-publishes the pack, and the user chose this file.
        known = "the recorded release" if digest == PACK_SHA256 else "a different release"
        log(f"zip: {path} (sha256 {digest}, {known})")
        return sheet_from_zip(data, origin=str(path)), f"{SHEET_NAME} in {path}"
    return data, str(path)


# --- Turning the sheet into sprites (pure functions on arrays) -------------

def load_sheet(png_bytes, origin="the sheet"):
    """Decode the tilesheet into an (H, W, 4) uint8 RGBA array."""
    try:
        with Image.open(io.BytesIO(png_bytes)) as image:
            # The sheet is a palette PNG with a transparent index; RGBA turns
            # that into a plain alpha channel we can test per pixel.
            rgba, mode = np.asarray(image.convert("RGBA")), image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise DataError(f"{origin} is not an image; pass the pack zip or {SHEET_NAME}") from None
    if mode in ("1", "L", "LA", "La", "I", "I;16", "F"):  # converting would make a grey "colored" dataset
        raise DataError(f"{origin} is a grayscale or bilevel image (PIL mode {mode}), not the pack's colored "
                        f"sheet; pass {SHEET_NAME} as downloaded")
    height, width = rgba.shape[:2]
    if height == 0 or width == 0 or height % TILE or width % TILE:
        raise DataError(f"{origin} is {width}x{height} pixels, not a grid of {TILE}x{TILE} "
                        f"tiles; pass {SHEET_NAME} (the 'packed' sheet, without spacing)")
    if (rgba[..., 3] >= ALPHA_MIN).all():
        raise DataError(f"{origin} has no transparent pixels; pass {SHEET_NAME}, "
                        "the transparent sheet, not the one with a background")
    return rgba


def slice_tiles(rgba):
    """Cut the sheet into tiles in reading order: index = row * columns + col."""
    rows, cols = rgba.shape[0] // TILE, rgba.shape[1] // TILE
    # (rows*16, cols*16, 4) -> (rows, 16, cols, 16, 4) -> (rows, cols, 16, 16, 4)
    tiles = rgba.reshape(rows, TILE, cols, TILE, 4).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(rows * cols, TILE, TILE, 4)
    return tiles, np.arange(rows * cols)


def foreground(tiles):
    """Boolean (T, 16, 16) mask of drawn pixels.

    On this sheet alpha is only ever 0 or 255 (it is 1-bit art); the threshold
    at 128 just makes a re-saved, slightly smoothed sheet behave the same way.
    """
    return tiles[..., 3] >= ALPHA_MIN


def composite(tiles, variant="colored"):
    """RGB sprites on a black background, (T, 16, 16, 3) uint8.

    Because every pixel is either fully drawn or fully empty, no alpha blending
    is needed: a drawn pixel keeps its colour (white for "mono"), the rest is black.
    """
    mask = foreground(tiles)[..., None]
    colour = np.full_like(tiles[..., :3], 255) if variant == "mono" else tiles[..., :3]
    return np.where(mask, colour, 0).astype(np.uint8)


def is_validation(tile_index):
    """True for every tenth tile of the sheet: the ~10% validation split.

    The choice depends only on the tile's position in the sheet, so a sprite
    stays on the same side whatever filters (--all, density bounds) are used,
    and the split never changes between runs or machines.
    """
    return np.asarray(tile_index) % VAL_EVERY == 0


def build_dataset(rgba, variant="colored", keep_all=False):
    """Return (arrays for the npz, number of non-empty tiles)."""
    tiles, tile_index = slice_tiles(rgba)
    density = foreground(tiles).mean(axis=(1, 2))   # fraction of the 256 pixels drawn
    if keep_all:
        keep = density > 0
    else:
        keep = (density >= DENSITY_MIN) & (density <= DENSITY_MAX)
    arrays = {
        "images": composite(tiles[keep], variant),
        "tile_index": tile_index[keep].astype(np.int32),
        "is_val": is_validation(tile_index[keep]),
        "density": density[keep].astype(np.float32),
    }
    return arrays, int((density > 0).sum())


def palette_line(images):
    """Distinct colours of the images with their share of pixels, most common first."""
    colours, counts = np.unique(images.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:PALETTE_SHOWN]
    shares = 100 * counts / counts.sum()
    shown = "  ".join(f"({r},{g},{b}) {shares[i]:.1f}%"
                      for i, (r, g, b) in zip(order, colours[order]))
    more = f"  (top {PALETTE_SHOWN} shown)" if len(colours) > PALETTE_SHOWN else ""
    return f"palette ({len(colours)} colours): {shown}{more}"


# --- Writing the output ------------------------------------------------------

def write_atomic(path, write):
    """Call write(file) on a temporary file, then rename it to `path`.

    os.replace is atomic on the same file system, so `path` is either the old
    complete file or the new complete file, never half of one, even if the run
    crashes or is interrupted with Ctrl-C (hence BaseException below).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".",
                                      suffix=".tmp", delete=False)
    try:
        with tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp.name, 0o644)   # temporary files are private; datasets need not be
        os.replace(tmp.name, path)
    except BaseException as exc:
        os.unlink(tmp.name)
        if isinstance(exc, OSError) and exc.filename in (None, tmp.name):
            exc.filename = str(path)  # the file the user asked for, not its temporary twin
        raise


def grid_image(images, columns, scale, gutter=(96, 96, 96)):
    """Sprites (N, H, W, 3) uint8 -> one PIL image: a grid with 1-pixel gutters,
    scaled up with nearest-neighbour so pixels stay hard-edged squares (any
    smoothing would invent colours that pixel art does not have). common.py
    draws its sample grids with this too."""
    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)                      # ceiling division
    grid = np.empty((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), np.uint8)
    grid[:] = gutter
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = image
    sheet = Image.fromarray(grid)
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)


def save_preview(path, images):
    """A PNG grid of every sprite, to look at the dataset."""
    sheet = grid_image(images, PREVIEW_COLUMNS, PREVIEW_SCALE)
    write_atomic(path, lambda f: sheet.save(f, format="PNG"))


def recorded_sha256(path):
    """The source_sha256 stored in an existing npz, or None if it is unusable."""
    try:
        with np.load(path) as data:
            if int(data["version"]) == FORMAT_VERSION:
                return str(data["source_sha256"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    return None


def prepare(source=None, variant="colored", keep_all=False, out="data", force=False, log=print):
    """Build the dataset and return the path of its npz file.

    source None downloads the pack; a path uses that zip or sheet PNG instead.
    An existing, matching output is left as it is unless force is True.
    """
    if variant not in ("colored", "mono"):
        raise DataError(f"unknown variant {variant!r}; use 'colored' or 'mono'")
    path = default_path(variant, keep_all, out)
    if source is None:
        if path.exists() and not force:
            log(f"{path} already exists; use --force to download and rebuild it")
            return path
        png = sheet_from_zip(download_pack(log), origin="the downloaded pack")
        origin = PACK_URL
    else:
        png, origin = read_source(source, log)
    digest = sha256_hex(png)
    if path.exists() and not force and recorded_sha256(path) == digest:
        log(f"{path} is up to date (sheet sha256 {digest[:16]}...); use --force to rebuild")
        return path

    rgba = load_sheet(png, origin=origin)
    # temporary files of a write a kill interrupted (write_atomic): this run rewrites both files
    orphans = [p for name in (path.name, path.with_suffix(".png").name) for p in path.parent.glob(f"{name}.*.tmp")]
    for p in orphans:
        p.unlink()
    if orphans:
        log(f"note: removed {len(orphans)} temporary file(s) left by an interrupted write in {path.parent}")
    arrays, non_empty = build_dataset(rgba, variant, keep_all)
    images = arrays["images"]
    if len(images) == 0:
        raise DataError(f"no sprites left after filtering {origin}; is it {SHEET_NAME}?")
    # The preview is written first and the npz last: the npz is what marks the
    # work as done, so an interrupted run is simply redone next time.
    try:
        save_preview(path.with_suffix(".png"), images)
        write_atomic(path, lambda f: np.savez_compressed(
            f, **arrays, source_sha256=np.str_(digest), variant=np.str_(variant),
            version=np.int64(FORMAT_VERSION)))
    except OSError as exc:
        raise DataError(f"cannot write to {path.parent} ({exc.strerror or exc}); "
                        "choose another folder with --out") from None

    rows, cols = rgba.shape[0] // TILE, rgba.shape[1] // TILE
    n_val = int(arrays["is_val"].sum())
    bounds = "all non-empty" if keep_all else f"density {DENSITY_MIN:.2f} to {DENSITY_MAX:.2f}"
    log(f"source: {origin} (sheet sha256 {digest})")
    log(f"sheet: {cols}x{rows} = {rows * cols} tiles, {non_empty} non-empty")
    log(f"kept: {len(images)} {variant} sprites ({bounds})")
    log(f"split: {len(images) - n_val} train, {n_val} validation "
        f"(every {VAL_EVERY}th tile of the sheet)")
    log(palette_line(images))
    log(f"wrote {path} ({path.stat().st_size:,} bytes) and {path.with_suffix('.png')}")
    return path


# --- Reading it back (common.load_sprites) ------------------------------------

def load_dataset(path):
    """The images (N, 16, 16, 3) uint8 and is_val (N,) of a prepared npz, checked;
    a missing default dataset is prepared first. A dataset must have training
    sprites and one is_val flag per sprite; an empty validation split is allowed
    (the Trainer then skips val/ metrics)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or a device would block np.load forever
        raise DataError(f"dataset {path} is not a regular file; pass the .npz that download.py wrote")
    if not path.exists():
        defaults = {default_path(v, a): (v, a) for v in ("colored", "mono") for a in (False, True)}
        if path not in defaults:
            raise DataError(f"dataset {path} not found; prepare one with `python download.py` "
                            f"(writes {default_path()}) or fix --data")
        variant, keep_all = defaults[path]
        print(f"dataset {path} not found: downloading and preparing the Kenney 1-Bit Pack ...")
        prepare(variant=variant, keep_all=keep_all, out=str(path.parent))
    try:
        with np.load(path) as npz:
            images, is_val = npz["images"], npz["is_val"].astype(bool)
    except Exception as e:  # a truncated or foreign file
        raise DataError(f"cannot read dataset {path} ({e}); re-create it with `python download.py --force`")
    if images.ndim != 4 or images.shape[1:] != (TILE, TILE, 3) or images.dtype != np.uint8:
        raise DataError(f"{path} holds images of shape {images.shape} {images.dtype}; expected (N, 16, 16, 3) uint8")
    redo = "re-create it with `python download.py --force`, or fix --data"
    if is_val.shape != (images.shape[0],):
        raise DataError(f"{path} has {images.shape[0]} sprites but is_val of shape {is_val.shape}; {redo}")
    if images.shape[0] == 0 or is_val.all():
        raise DataError(f"{path} has no training sprites ({images.shape[0]} sprites, "
                        f"{int(is_val.sum())} of them validation); {redo}")
    return images, is_val


# --- The command line: every expected failure is one line --------------------
# Shared by every script of the project (common.py and compare.py use these too).


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, `error: ...; see --help`,
    instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}; run `python {self.prog} --help` for the flags\n")


def fail(message):
    """Print `error: <what is wrong>; <what to do>` as one line and exit with status 2."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(message))  # no control characters (ANSI escapes) from a file
    print(f"error: {' '.join(text.split())}", file=sys.stderr)
    sys.exit(2)


def os_error_line(exc):
    """An OSError (unwritable or missing folder, full disk...) as one line."""
    where = f" {exc.filename}" if exc.filename else ""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):  # e.g. --out some_file/run
        return f"cannot create{where}: a file is in the way ({exc.strerror}); choose another path"
    if exc.errno == errno.ENOSPC:
        return f"cannot write{where} ({exc.strerror}): the disk is full; free some space or choose another path"
    return (f"cannot write or read{where} ({exc.strerror or exc}); check that the path is a writable folder "
            f"with free space, or choose another one")


def guarded(main, user_errors=()):
    """Run a script's main(): a problem the user can fix (DataError, the
    `user_errors` given, an OSError such as a full disk) becomes one line and
    exit status 2; Ctrl-C exits with status 130, printing the interruption's
    message if it has one (e.g. where the checkpoint was saved). Anything
    else is a bug and keeps its traceback."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # undo the quiet import-time handler
    try:
        main()
    except (DataError, *user_errors) as exc:
        fail(exc)
    except OSError as exc:
        fail(os_error_line(exc))
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted; nothing half-written was left behind", file=sys.stderr)
        sys.exit(getattr(exc, "status", 130))  # 143 after SIGTERM (common.Interrupted)


def parse_args(argv=None):
    parser = OneLineParser(
        description="Fetch Kenney's 1-Bit Pack (CC0) and save its 16x16 sprites as a\n"
                    "compressed numpy file (.npz), plus a preview image (.png).",
        epilog="two ways to run it:\n"
               "  python download.py              download the pack from kenney.nl\n"
               "  python download.py --from PATH  use the pack zip, or its sheet\n"
               f"                                  {SHEET_NAME},\n"
               f"                                  downloaded by hand from {PACK_PAGE}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", metavar="PATH",
                        help="a local pack zip or tilesheet PNG instead of downloading")
    parser.add_argument("--variant", choices=["colored", "mono"], default="colored",
                        help="keep the colours, or draw every sprite in white (default: colored)")
    parser.add_argument("--all", dest="keep_all", action="store_true",
                        help="keep every non-empty tile, not only those with density "
                             f"{DENSITY_MIN:.2f} to {DENSITY_MAX:.2f}")
    parser.add_argument("--out", default="data", metavar="DIR",
                        help="output folder (default: data)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    def run():
        args = parse_args(argv)
        prepare(args.source, args.variant, args.keep_all, args.out, args.force)
    guarded(run)  # problems with the input are one line, not a traceback


if __name__ == "__main__":
    main()
