"""A real cross-theme retrieval dataset from installed freedesktop icon themes.

Many artists have drawn the same named icons ("folder", "edit-copy", "audio-volume-high"): a
model trained on some themes and tested on a theme it never saw must match the *meaning* of a
picture, not one artist's style. ``build_icon_dataset`` (``coembed data icons``) builds that set:

Finding themes
    A theme is a folder holding ``index.theme`` in one of the usual icon folders
    (``$XDG_DATA_HOME/icons`` or ``~/.local/share/icons``, ``~/.icons``, each ``$XDG_DATA_DIRS``
    entry + ``/icons``, by default ``/usr/local/share/icons`` and ``/usr/share/icons``) or in a
    ``--root`` (a folder of themes, or one theme folder). A theme may be spread over several of
    these folders; all of them are read. ``hicolor``, ``locolor`` and ``default`` are fallbacks,
    not artists' themes: left out unless named.

Picking one picture per (theme, icon name)
    ``index.theme`` lists the icon folders (``Directories``) with their ``Context``, ``Size``,
    ``Type`` and ``Scale``; other folders, ``ScaledDirectories`` and ``Scale`` > 1 are ignored.
    For each name: an SVG in a ``Scalable`` folder that may be drawn at ``size``, else the
    smallest fixed size at or above ``size``, else the largest (SVG before PNG before XPM at
    one size). Names ending in ``-symbolic`` (monochrome glyphs of the same names; also
    ``-symbolic-rtl``/``-ltr``) are skipped.
    Symlinks are followed; a broken one, or one that leaves every icon folder, is skipped.
    SVG (and gzip-compressed ``.svgz``) is drawn by resvg without system fonts; PNG/XPM are read
    with PIL and resized. Every picture is saved as an RGB PNG of ``size`` x ``size``, alpha
    composited on white, the drawing centred.

Duplicates
    Names of one theme whose pictures are one file (a symlink alias) or byte-identical files
    give one picture, captioned by the name most of the selected themes have (tie: the shorter,
    then the first alphabetically); the others count as ``alias``. A picture whose bytes an
    earlier theme already gave (train themes first, then val, then test) counts as
    ``duplicate``. A theme is a *variant* of another selected theme, and skipped whole, when at
    least half of its pictures are files inside that theme (Papirus-Dark -> Papirus, ePapirus
    -> Papirus), or when its name is the other's name plus ``-something`` (Yaru-blue,
    breeze-dark, Numix-Light).

Captions (lowercase)
    The name's words (``-``, ``_`` and ``.`` are spaces; a reverse-DNS application id such as
    ``org.gnome.Nautilus`` keeps only its last part), without the noise words ``gnome``,
    ``gtk``, ``stock``, ``x`` and a trailing ``symbolic`` (all kept when nothing else is
    left), then the context:
    ``audio-volume-high`` in Status -> "audio volume high, status icon"; Applications ->
    "application icon", Places -> "place icon", Devices -> "device icon", Actions -> "action
    icon", MimeTypes -> "file type icon". MIME type names are read as files:
    ``application-x-executable`` -> "executable file", ``text-x-python`` -> "python file",
    ``x-office-document`` -> "office document file", ``image-png`` -> "png image file",
    ``text-plain`` -> "text file". A context without a phrase (Adwaita's "legacy") gives
    "<words> icon". The context of a name is the one most selected themes file it under
    (ties: alphabetical), so one name has one caption, and one output folder, in every theme.

Splits by theme
    Test and validation themes are never trained on. By default the test theme is the selected
    theme with the most names that other selected themes also have, the validation theme the
    next (ties: alphabetical); the rest train. Validation and test keep only pictures whose
    name (caption) is also in the training rows (``not_in_training`` otherwise).
    ``max_per_theme`` keeps, per theme, the pictures whose names most themes share (ties:
    alphabetical).

Output (``output/``)
    ``images/<theme>/<context>/<name>.png``, ``train.csv``, ``val.csv``, ``test.csv`` (columns
    ``filepath,caption,theme,name,context``, paths relative to ``output``), ``stats.json``
    (per theme: names found, kept, skipped by reason) and ``README.md``. Images are written
    first and the CSVs last, each file under a temporary name and renamed, so an interrupted
    build never leaves a CSV that names a missing picture. Everything is traversed in sorted
    order: the same command on the same themes writes byte-identical files.
"""

from __future__ import annotations

import configparser
import csv
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from coembed.errors import DataError, UsageError
from coembed.files import atomic_write, atomic_write_text
from coembed.process import worker_signals
from coembed.progress import progress_bar

FALLBACK_THEMES = ("default", "hicolor", "locolor")
EXTENSIONS = (".svg", ".svgz", ".png", ".xpm")  # also the preference at one size
COLUMNS = ("filepath", "caption", "theme", "name", "context")
SPLITS = ("train", "val", "test")
# Why a name found in a theme gave no row, in the order the report prints them.
REASONS = (
    "symbolic",
    "broken_link",
    "outside_roots",
    "alias",
    "duplicate",
    "not_in_training",
    "max_per_theme",
    "unrenderable",
    "blank",
    "variant",
)
OUTPUT_NAMES = {"images", "train.csv", "val.csv", "test.csv", "stats.json", "README.md"}

# index.theme Context -> the folder name used in the output, and what the caption says.
CONTEXT_FOLDERS = {
    "applications": "apps",
    "apps": "apps",
    "actions": "actions",
    "devices": "devices",
    "mimetypes": "mimetypes",
    "places": "places",
    "filesystems": "places",
    "status": "status",
    "categories": "categories",
    "emblems": "emblems",
    "emotes": "emotes",
    "animations": "animations",
    "international": "intl",
    "intl": "intl",
}
CONTEXT_PHRASES = {
    "apps": "application icon",
    "actions": "action icon",
    "devices": "device icon",
    "mimetypes": "file type icon",
    "places": "place icon",
    "status": "status icon",
    "categories": "category icon",
    "emblems": "emblem icon",
    "emotes": "emote icon",
    "animations": "animation icon",
    "intl": "flag icon",
}
NOISE_WORDS = {"gnome", "gtk", "stock", "x", "symbolic"}
MIME_NOISE_WORDS = NOISE_WORDS | {"mime", "vnd", "generic"}
# MIME major type -> (phrase for a specific subtype, phrase when nothing specific is left).
MIME_MAJORS = {
    "application": ("{} file", "file"),
    "text": ("{} file", "text file"),
    "image": ("{} image file", "image file"),
    "audio": ("{} audio file", "audio file"),
    "video": ("{} video file", "video file"),
    "font": ("{} font file", "font file"),
    "model": ("{} model file", "3d model file"),
    "inode": ("{}", "file system item"),
    "message": ("{} message", "message"),
    "multipart": ("{} file", "file"),
}
GENERIC_SUBTYPES = {"plain", "generic"}
REVERSE_DNS_HEADS = {"org", "com", "net", "io", "de", "fr", "info", "dev", "app", "me", "eu"}


# ---------------------------------------------------------------------------------- captions


def _words(text: str) -> list[str]:
    for sep in "-_.":
        text = text.replace(sep, " ")
    return text.lower().split()


def _without(words: list[str], noise: set[str]) -> list[str]:
    # "symbolic" is noise only as a suffix: "emblem-symbolic-link" is a symbolic link.
    kept = [
        w for i, w in enumerate(words) if w not in noise or (w == "symbolic" and i + 1 < len(words))
    ]
    return kept or words


def _mime_words(name: str) -> str:
    words = [w for w in _words(name) if w not in MIME_NOISE_WORDS or w == "generic"]
    if words and words[0] in MIME_MAJORS:
        specific, generic = MIME_MAJORS[words[0]]
        rest = [w for w in words[1:] if w not in GENERIC_SUBTYPES]
        return specific.format(" ".join(rest)) if rest else generic
    words = [w for w in words if w not in GENERIC_SUBTYPES] or words
    if not words:
        return "file"
    return " ".join(words) if words[-1] == "file" else " ".join([*words, "file"])


def readable_name(name: str, context: str) -> str:
    """The words of an icon name (``context`` is an output folder name such as ``mimetypes``)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0].lower() in REVERSE_DNS_HEADS:
        name = parts[-1]  # an application id: org.gnome.Nautilus -> Nautilus
    if context == "mimetypes":
        return _mime_words(name)
    return " ".join(_without(_words(name), NOISE_WORDS))


def caption_for(name: str, context: str) -> str:
    """The caption of icon ``name`` in output context folder ``context``.

    ``caption_for("audio-volume-high", "status") == "audio volume high, status icon"``.
    """
    words = readable_name(name, context)
    return f"{words}, {CONTEXT_PHRASES[context]}" if context in CONTEXT_PHRASES else f"{words} icon"


def context_folder(context: str) -> str:
    """The output folder of an index.theme Context ("Applications" -> "apps")."""
    key = "".join(c for c in context.lower() if c.isalnum())
    return CONTEXT_FOLDERS.get(key, key or "other")


def is_symbolic(name: str) -> bool:
    """Whether ``name`` is a monochrome ``-symbolic`` glyph (left out of the dataset)."""
    # Adwaita also ships pre-rendered "foo-symbolic.symbolic.png"; right-to-left glyphs are
    # "foo-symbolic-rtl" (and "-ltr").
    return name.endswith(("-symbolic", ".symbolic", "-symbolic-rtl", "-symbolic-ltr"))


# ---------------------------------------------------------------------------------- themes


@dataclass(frozen=True)
class IconDir:
    """One icon folder of a theme, as ``index.theme`` describes it."""

    path: str  # relative to the theme folder
    context: str  # output folder name, e.g. "apps"
    size: int
    scalable: bool
    max_size: int


@dataclass
class Theme:
    """An icon theme: its name, its folders and the icon folders its index.theme lists."""

    name: str
    folders: list[Path]  # the theme's folder in each icon folder that has one, search order
    icon_dirs: list[IconDir] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    """One file that draws an icon name in a theme."""

    real: str  # the real path, symlinks resolved
    ext: str
    icon_dir: IconDir

    def rank(self, size: int) -> tuple:
        """Smaller is better: a scalable SVG, else the closest size >= ``size``, else larger."""
        d = self.icon_dir
        fmt = EXTENSIONS.index(self.ext)
        if d.scalable and self.ext in (".svg", ".svgz") and d.max_size >= size:
            return (0, 0, fmt, d.path)
        drawn = d.max_size if d.scalable else d.size
        if drawn >= size:
            return (1, drawn, fmt, d.path)
        return (2, -drawn, fmt, d.path)


@dataclass
class ThemeScan:
    """Every icon name of a theme: its usable files, or why it has none."""

    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    files: Counter = field(default_factory=Counter)  # scanned, broken_link, outside_roots

    _picks: dict[str, Candidate] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        """The icon names with at least one usable file."""
        return set(self.candidates)

    def picks(self, size: int) -> dict[str, Candidate]:
        """name -> the file to draw it from at ``size`` (every scan is built for one size)."""
        if not self._picks:
            self._picks = {n: pick(c, size) for n, c in sorted(self.candidates.items())}
        return self._picks

    def found(self) -> int:
        """Icon names found: usable or skipped."""
        return len(self.candidates) + len(self.skipped)


def icon_search_dirs(env: dict[str, str] | None = None) -> list[Path]:
    """The usual icon folders, in the freedesktop search order (existing or not)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    data_home = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
    data_dirs = env.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    out = [data_home / "icons", home / ".icons"]
    out += [Path(d) / "icons" for d in data_dirs.split(":") if d]
    return out


def _parse_index(path: Path) -> list[IconDir]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(path.read_text(encoding="utf-8", errors="replace"))
    except configparser.Error:
        return []
    if not parser.has_section("Icon Theme"):
        return []
    listed = parser.get("Icon Theme", "Directories", fallback="")
    out = []
    for rel in dict.fromkeys(d.strip() for d in listed.split(",") if d.strip()):
        if not parser.has_section(rel):
            continue
        section = parser[rel]
        try:
            size = int(section.get("Size", "0"))
            scale = int(section.get("Scale", "1"))
            max_size = int(section.get("MaxSize", str(size)))
        except ValueError:
            continue
        kind = section.get("Type", "Threshold").strip().lower()
        if scale != 1 or size <= 0:
            continue
        scalable = kind == "scalable"
        out.append(
            IconDir(
                rel,
                context_folder(section.get("Context", "")),
                size,
                scalable,
                max_size if scalable else size,
            )
        )
    return out


def discover_themes(roots: Sequence[str | os.PathLike] = ()) -> tuple[dict[str, Theme], list[Path]]:
    """Every theme in ``roots`` and the usual icon folders; returns (name -> Theme, icon roots).

    A root holding ``index.theme`` is a theme itself; any other root is a folder of themes.
    Raises ``DataError`` for a root that is not a folder.
    """
    bases: list[Path] = []
    direct: list[Path] = []
    for root in roots:
        p = Path(os.path.expanduser(os.fspath(root)))
        if not p.is_dir():
            raise DataError(
                f"{root}: no such folder; --root takes a folder of icon themes "
                "(folders with index.theme) or one theme folder"
            )
        (direct if (p / "index.theme").is_file() else bases).append(p)
    bases += [p for p in icon_search_dirs() if p.is_dir()]
    children = [c for base in bases for c in sorted(base.iterdir()) if c.is_dir()]
    # A theme may be spread over several icon folders; one of them must hold index.theme.
    named = {c.name for c in [*direct, *children] if (c / "index.theme").is_file()}
    themes: dict[str, Theme] = {}
    for folder in [*direct, *children]:
        if folder.name in named:
            themes.setdefault(folder.name, Theme(folder.name, [])).folders.append(folder)
    for theme in themes.values():
        index = next(f / "index.theme" for f in theme.folders if (f / "index.theme").is_file())
        theme.icon_dirs = _parse_index(index)
    roots_real = [os.path.realpath(p) for p in [*bases, *direct]]
    return dict(sorted(themes.items())), [Path(p) for p in dict.fromkeys(roots_real)]


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def _real_file(path: str, dir_cache: dict[str, str]) -> str | None:
    """The real path of the file that symlink ``path`` (in a real folder) leads to; None if
    the link is broken, loops or ends at something other than a file.

    os.path.realpath checks every path component of every link: on themes with tens of
    thousands of aliases that took most of a build; folders are resolved once here instead.
    """
    for _ in range(40):  # the kernel's own limit on nested links
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if not stat.S_ISLNK(mode):
            return path if stat.S_ISREG(mode) else None
        head, tail = os.path.split(os.path.join(os.path.dirname(path), os.readlink(path)))
        if head not in dir_cache:
            dir_cache[head] = os.path.realpath(head)
        path = os.path.join(dir_cache[head], tail)
    return None


def scan_theme(theme: Theme, icon_roots: Sequence[Path]) -> ThemeScan:
    """List every icon file of ``theme`` (sorted), following symlinks."""
    roots = [str(r) for r in icon_roots]
    scan = ThemeScan()
    bad: dict[str, str] = {}
    dir_cache: dict[str, str] = {}
    for folder in theme.folders:
        for icon_dir in theme.icon_dirs:
            path = folder / icon_dir.path
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError:
                continue
            real_dir = os.path.realpath(path)
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                ext = ext.lower()
                if ext not in EXTENSIONS:
                    continue
                scan.files["scanned"] += 1
                if is_symbolic(stem):
                    bad[stem] = "symbolic"
                    continue
                if entry.is_symlink():
                    real = _real_file(os.path.join(real_dir, entry.name), dir_cache)
                    if real is None:
                        scan.files["broken_link"] += 1
                        bad.setdefault(stem, "broken_link")
                        continue
                    if not _inside(real, roots):
                        scan.files["outside_roots"] += 1
                        bad.setdefault(stem, "outside_roots")
                        continue
                elif entry.is_file():
                    real = os.path.join(real_dir, entry.name)
                else:
                    continue
                scan.candidates.setdefault(stem, []).append(Candidate(real, ext, icon_dir))
    scan.skipped = {name: reason for name, reason in bad.items() if name not in scan.candidates}
    return scan


def pick(candidates: Iterable[Candidate], size: int) -> Candidate:
    """The file to draw an icon name from at ``size`` pixels (see the module docstring)."""
    return min(candidates, key=lambda c: c.rank(size))


# ---------------------------------------------------------------------------------- rendering


class RenderError(Exception):
    """A picture that cannot be drawn; ``reason`` is ``unrenderable`` or ``blank``."""

    def __init__(self, message: str, reason: str = "unrenderable") -> None:
        super().__init__(message)
        self.reason = reason


def render_icon(path: str | os.PathLike, size: int) -> Image.Image:
    """Draw an icon file as an RGB ``size`` x ``size`` picture on white (centred, aspect kept).

    Raises ``RenderError`` for a file that cannot be drawn, or draws nothing visible.
    """
    import resvg_py

    from coembed.data.images import ImageReadError, open_image

    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
        if path.lower().endswith((".svg", ".svgz")):
            if data[:2] == b"\x1f\x8b":  # .svgz, or an .svg that is gzipped anyway
                data = gzip.decompress(data)
            png = resvg_py.svg_to_bytes(
                svg_string=data.decode("utf-8", errors="replace"),
                width=size,
                height=size,
                skip_system_fonts=True,  # the same pictures on every machine
            )
            data = bytes(png)
        picture = open_image(data)
    except ImageReadError as e:
        raise RenderError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError) as e:
        raise RenderError(f"{path}: {e}") from None
    except BaseException as e:  # resvg reports a Rust panic as a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise RenderError(f"{path}: {type(e).__name__}: {e}") from None
    if picture.size != (size, size):
        scale = size / max(picture.size)
        w, h = (max(1, round(side * scale)) for side in picture.size)
        picture = picture.resize((w, h), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(picture, ((size - w) // 2, (size - h) // 2))
        picture = canvas
    if all(lo == 255 for lo, _ in picture.getextrema()):
        raise RenderError(f"{path}: draws nothing visible on white", "blank")
    return picture


def _render_task(task: tuple[str, str, int]) -> str | None:
    """Worker: draw ``src`` into ``dst`` (atomically); None on success, else the skip reason."""
    src, dst, size = task
    try:
        picture = render_icon(src, size)
    except RenderError as e:
        return e.reason
    atomic_write(dst, lambda tmp: picture.save(tmp, format="PNG"))
    return None


def _render_all(tasks: list[tuple[str, str, int]], workers: int, desc: str) -> list[str | None]:
    for _, dst, _ in tasks:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
    bar = progress_bar(total=len(tasks), desc=desc, unit="icon")
    results: list[str | None] = []
    with bar:
        if workers <= 1 or len(tasks) < 200:
            for task in tasks:
                results.append(_render_task(task))
                bar.update()
        else:
            pool = multiprocessing.Pool(workers, worker_signals)
            try:
                for result in pool.imap(_render_task, tasks, chunksize=32):
                    results.append(result)
                    bar.update()
            except BaseException:
                pool.terminate()  # an interrupt or error: do not wait for the remaining icons
                raise
            pool.close()
            pool.join()
    return results


# ---------------------------------------------------------------------------------- the build


@dataclass
class Picture:
    """One planned row: a theme's picture of one or more icon names."""

    theme: str
    name: str  # the caption name
    context: str
    source: str  # real path of the file drawn
    digest: str

    @property
    def filepath(self) -> str:
        """The picture's path in the output folder, as the CSVs name it."""
        return f"images/{self.theme}/{self.context}/{self.name}.png"

    def row(self) -> dict[str, str]:
        """The CSV row: filepath, caption, theme, name, context."""
        caption = caption_for(self.name, self.context)
        return {
            "filepath": self.filepath,
            "caption": caption,
            "theme": self.theme,
            "name": self.name,
            "context": self.context,
        }


@dataclass
class ThemeStats:
    """One theme's counts: names found and kept, skips by reason, and its split."""

    found: int = 0
    kept: int = 0
    split: str = ""
    variant_of: str | None = None
    skipped: Counter = field(default_factory=Counter)
    files: Counter = field(default_factory=Counter)

    def as_json(self) -> dict:
        """The theme's entry in stats.json."""
        out = {
            "split": self.split,
            "found": self.found,
            "kept": self.kept,
            "skipped": {r: self.skipped[r] for r in REASONS if self.skipped[r]},
            "files": dict(sorted(self.files.items())),
        }
        if self.variant_of:
            out["variant_of"] = self.variant_of
        return out


@dataclass
class IconDatasetReport:
    """What a build wrote: rows per split and per-theme counts."""

    output: Path
    size: int
    splits: dict[str, list[str]]  # split -> theme names
    rows: dict[str, list[dict[str, str]]]
    themes: dict[str, ThemeStats]
    seconds: float = 0.0

    def table(self) -> str:
        """The build as one table: a line per theme, totals, and rows per split.

        Each theme's line holds its split, names found and kept, and skips by reason; themes
        without icons are named on one line below.
        """
        shown = {n: s for n, s in self.themes.items() if s.found}
        total = ThemeStats()
        for s in shown.values():
            total.found, total.kept = total.found + s.found, total.kept + s.kept
            total.skipped.update(s.skipped)
        reasons = [r for r in REASONS if total.skipped[r]]
        labels = {n: f"={s.variant_of}" if s.variant_of else s.split for n, s in shown.items()}
        w_name = max([len("theme"), *map(len, shown)])
        w_split = max([len("split"), *map(len, labels.values())])
        widths = [max(len(c), 6) for c in ("found", "kept", *reasons)]

        def line(name: str, split: str, values: list[int | str]) -> str:
            cells = "".join(f" {v:>{w}}" for v, w in zip(values, widths))
            return f"{name:<{w_name}}  {split:<{w_split}}{cells}"

        lines = [line("theme", "split", ["found", "kept", *reasons])]
        for name, s in shown.items():
            lines.append(
                line(name, labels[name], [s.found, s.kept, *(s.skipped[r] for r in reasons)])
            )
        lines.append(
            line("total", "", [total.found, total.kept, *(total.skipped[r] for r in reasons)])
        )
        empty = [n for n, s in self.themes.items() if not s.found]
        if empty:
            lines.append(f"no icons: {', '.join(empty)}")
        counts = ", ".join(f"{split} {len(self.rows[split])}" for split in SPLITS)
        lines.append(f"rows: {counts} (=X: a variant of theme X); {self.seconds:.1f} s")
        return "\n".join(lines)


def _file_digest(path: str, cache: dict[str, str]) -> str:
    if path not in cache:
        cache[path] = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    return cache[path]


def _owner(real: str, theme_folders: list[tuple[str, str]], cache: dict) -> str | None:
    """The theme whose folder holds the real file ``real`` (cached per folder)."""
    directory = os.path.dirname(real)
    if directory not in cache:
        cache[directory] = next(
            (name for folder, name in theme_folders if real.startswith(folder + os.sep)), None
        )
    return cache[directory]


def _find_variants(
    selected: list[str], scans: dict[str, ThemeScan], themes: dict[str, Theme], size: int
) -> dict[str, str]:
    """theme -> the selected theme it is a variant of (see the module docstring)."""
    # Longest folders first, so a theme inside another theme's folder is found first.
    folders = sorted(
        ((os.path.realpath(f), t.name) for t in themes.values() for f in t.folders),
        key=lambda x: -len(x[0]),
    )
    parent: dict[str, str] = {}
    cache: dict[str, str | None] = {}
    for name in selected:
        picks = [c.real for c in scans[name].picks(size).values()]
        owners = Counter(_owner(real, folders, cache) for real in picks)
        owners.pop(name, None)
        owners.pop(None, None)
        best = sorted(owners.items(), key=lambda x: (-x[1], x[0]))
        if best and best[0][0] in selected and 2 * best[0][1] >= len(picks):
            parent[name] = best[0][0]
            continue
        prefixes = [o for o in selected if name.lower().startswith(o.lower() + "-")]
        if prefixes:
            parent[name] = max(prefixes, key=len)
    roots = {}
    for name in parent:
        seen, root = {name}, parent[name]
        while root in parent and root not in seen:
            seen.add(root)
            root = parent[root]
        if root != name:
            roots[name] = root
    return roots


def _name_contexts(scans: list[ThemeScan], size: int) -> dict[str, str]:
    """name -> the context most themes file it under, so a name has one caption everywhere.

    Contexts without a caption phrase (Adwaita's "legacy", "ui", "panel") count only when no
    theme files the name under a known one; ties go to the first alphabetically."""
    votes: dict[str, Counter] = {}
    for scan in scans:
        for name, best in scan.picks(size).items():
            votes.setdefault(name, Counter())[best.icon_dir.context] += 1
    out = {}
    for name, counter in votes.items():
        known = {c: n for c, n in counter.items() if c in CONTEXT_PHRASES} or counter
        out[name] = min(known, key=lambda c: (-known[c], c))
    return out


def _default_splits(
    usable: list[str], names: dict[str, set[str]], val: list[str], test: list[str]
) -> tuple[list[str], list[str]]:
    """Test: the theme with most names that other themes share; val: the next (see --help)."""

    def shared(theme: str) -> int:
        others = set().union(*(names[t] for t in usable if t != theme))
        return len(names[theme] & others)

    order = sorted(usable, key=lambda t: (-shared(t), t))
    if not test:
        test = [next(t for t in order if t not in val)]
    if not val:
        val = [next(t for t in order if t not in test)]
    return val, test


def _too_few_themes(
    selected: list[str], usable: list[str], variants: dict[str, str], stats: dict
) -> DataError:
    """The error for fewer than 3 themes with usable icons, saying what happened to the rest."""
    head = f"only {len(usable)} theme(s) with usable icons ({', '.join(usable)})"
    parts = [f"{head if usable else 'nothing usable'}: a build needs 3 (train, val, test)"]
    if variants:
        shown = ", ".join(f"{v} of {p}" for v, p in sorted(variants.items()))
        parts.append(f"variants left out: {shown}")
    empty = [n for n in selected if n not in usable and n not in variants]
    if empty:
        skipped = sum((stats[n].skipped for n in empty), Counter())
        why = ", ".join(f"{r} {skipped[r]}" for r in REASONS if skipped[r]) or "no icon files"
        parts.append(f"no usable icons in {', '.join(empty)} ({why})")
    parts.append(
        "install more themes (e.g. `sudo apt-get install papirus-icon-theme "
        "breeze-icon-theme`) or add folders with --root"
    )
    return DataError("; ".join(parts))


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: is a file; --output must be a folder")
    if output.is_dir():
        others = sorted(
            p.name
            for p in output.iterdir()
            if p.name not in OUTPUT_NAMES and not p.name.startswith(".")
        )
        if others:
            raise UsageError(
                f"{output}: holds other files ({', '.join(others[:3])}); give a new or empty "
                "folder, or one an earlier `coembed data icons` wrote"
            )


def _select(
    themes: dict[str, Theme], wanted: Sequence[str] | None, val: Sequence[str], test: Sequence[str]
) -> list[str]:
    found = ", ".join(themes) or "none"
    for name in [*(wanted or []), *val, *test]:
        if name not in themes:
            raise DataError(
                f"theme {name!r} is not installed; found: {found} (add its folder with --root)"
            )
    if wanted:
        outside = [t for t in [*val, *test] if t not in wanted]
        if outside:
            raise UsageError(
                f"{', '.join(outside)}: a val/test theme must also be named in --themes"
            )
        if len(set(wanted)) < 3:
            raise UsageError(
                f"--themes names {len(set(wanted))} theme(s); a build needs at least 3 "
                "(train, validation and test themes)"
            )
        return sorted(set(wanted))
    return [n for n in themes if n not in FALLBACK_THEMES or n in [*val, *test]]


def _plan_theme(
    theme: str,
    scan: ThemeScan,
    stats: ThemeStats,
    popularity: Counter,
    contexts: dict[str, str],
    size: int,
    digests: dict[str, str],
    taken: set[str],
    allowed: set[str] | None,
    max_per_theme: int | None,
) -> list[Picture]:
    """The pictures of one theme, after aliases, duplicates, the name filter and the cap."""
    groups: dict[str, list[tuple[str, Candidate]]] = {}
    for name, best in scan.picks(size).items():
        groups.setdefault(_file_digest(best.real, digests), []).append((name, best))
    pictures = []
    for digest, members in groups.items():
        name, best = min(members, key=lambda m: (-popularity[m[0]], len(m[0]), m[0]))
        stats.skipped["alias"] += len(members) - 1
        if allowed is not None and name not in allowed:
            stats.skipped["not_in_training"] += 1
        elif digest in taken:
            stats.skipped["duplicate"] += 1
        else:
            pictures.append(Picture(theme, name, contexts[name], best.real, digest))
    pictures.sort(key=lambda p: (-popularity[p.name], p.name))
    if max_per_theme is not None and len(pictures) > max_per_theme:
        stats.skipped["max_per_theme"] += len(pictures) - max_per_theme
        pictures = pictures[:max_per_theme]
    taken.update(p.digest for p in pictures)
    return sorted(pictures, key=lambda p: p.filepath)


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _readme(report: IconDatasetReport, argv_text: str) -> str:
    lines = [
        "# Icon themes: a cross-theme image-text retrieval set",
        "",
        "Built by coembed from the freedesktop icon themes installed on the machine:",
        "",
        "```",
        argv_text,
        "```",
        "",
        f"Each picture is one icon name of one theme, an RGB PNG of {report.size}x{report.size} "
        "on white. Captions come from the icon name and its context (e.g. "
        '"audio volume high, status icon"); the rules are in the docstring of '
        "`coembed.datasets.icons`. Validation and test themes are never trained on, and keep only "
        "names the training themes also have.",
        "",
        "| split | themes | rows |",
        "|---|---|---|",
    ]
    for split in SPLITS:
        lines.append(f"| {split} | {', '.join(report.splits[split])} | {len(report.rows[split])} |")
    lines += [
        "",
        "Files: `images/<theme>/<context>/<name>.png`; `train.csv`, `val.csv`, `test.csv` with "
        "columns `filepath,caption,theme,name,context` (paths relative to this folder); "
        "`stats.json`: per theme, icon names found, kept, and skipped by reason.",
        "",
    ]
    return "\n".join(lines)


def _checked_theme_options(
    size: int, max_per_theme: int | None, val_themes: Sequence[str], test_themes: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The val and test theme lists without repeats; ``UsageError`` for a bad size, cap or overlap."""
    if not 8 <= size <= 1024:
        raise UsageError(f"--size {size}: give a picture side between 8 and 1024 pixels")
    if max_per_theme is not None and max_per_theme < 1:
        raise UsageError(f"--max-per-theme {max_per_theme}: give 1 or more")
    val, test = list(dict.fromkeys(val_themes)), list(dict.fromkeys(test_themes))
    if set(val) & set(test):
        raise UsageError(
            f"{', '.join(sorted(set(val) & set(test)))}: a theme can be in "
            "--val-themes or --test-themes, not both"
        )
    return val, test


@dataclass
class _Plan:
    """What a build will draw: the themes, their scans and counts, and the split of each."""

    selected: list[str]  # every theme looked at, in order
    scans: dict[str, ThemeScan]
    stats: dict[str, ThemeStats]
    usable: list[str]  # themes with icons that are not a variant of another
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> theme names


def _scan_themes(
    themes: Sequence[str] | None,
    roots: Sequence[str | os.PathLike],
    size: int,
    val_themes: list[str],
    test_themes: list[str],
) -> _Plan:
    """Find and scan the selected themes and leave out variants; splits are chosen next."""
    found_themes, icon_roots = discover_themes(roots)
    selected = _select(found_themes, themes, val_themes, test_themes)
    scans = {name: scan_theme(found_themes[name], icon_roots) for name in selected}
    stats = {
        name: ThemeStats(found=scans[name].found(), files=scans[name].files) for name in selected
    }
    for name in selected:
        stats[name].skipped.update(scans[name].skipped.values())
    candidates = [n for n in selected if scans[n].candidates]
    variants = _find_variants(candidates, scans, found_themes, size)
    for name, parent in variants.items():
        if name in val_themes or name in test_themes:
            raise UsageError(
                f"{name} is a variant of {parent} (its icons are mostly {parent}'s); pick another "
                f"val/test theme, or leave {parent} out with --themes"
            )
        stats[name].variant_of = parent
        stats[name].split = "variant"
        stats[name].skipped["variant"] += len(scans[name].candidates)
    usable = [n for n in candidates if n not in variants]
    for name in selected:
        if not scans[name].candidates:
            stats[name].split = "none"
    if len(usable) < 3:
        raise _too_few_themes(selected, usable, variants, stats)
    return _Plan(selected, scans, stats, usable)


def _choose_splits(plan: _Plan, val_themes: list[str], test_themes: list[str]) -> None:
    """Fill in ``plan``'s val, test and train themes (the defaults: see the module docstring)."""
    usable = plan.usable
    missing = [t for t in [*val_themes, *test_themes] if t not in usable]
    if missing:
        raise UsageError(f"{', '.join(missing)}: no usable icons, cannot be a val/test theme")
    names = {n: plan.scans[n].names for n in usable}
    plan.val, plan.test = _default_splits(usable, names, val_themes, test_themes)
    split_of = {
        n: "val" if n in plan.val else "test" if n in plan.test else "train" for n in usable
    }
    plan.splits = {s: [n for n in usable if split_of[n] == s] for s in SPLITS}
    if not plan.splits["train"]:
        raise UsageError(
            f"--val-themes and --test-themes take every usable theme ({', '.join(usable)}); "
            "leave at least one for training"
        )


def _render_split(
    planned: list[Picture],
    stats: dict[str, ThemeStats],
    out: Path,
    size: int,
    workers: int,
    split: str,
) -> list[dict[str, str]]:
    """Draw one split's pictures into ``out``; returns the rows of those drawn, counts the rest."""
    tasks = [(p.source, str(out / p.filepath), size) for p in planned]
    results = _render_all(tasks, workers, f"rendering {split}")
    rows = []
    for picture, reason in zip(planned, results):
        if reason:
            stats[picture.theme].skipped[reason] += 1
        else:
            stats[picture.theme].kept += 1
            rows.append(picture.row())
    return rows


def _render_splits(
    plan: _Plan, out: Path, size: int, max_per_theme: int | None, workers: int
) -> dict[str, list[dict[str, str]]]:
    """Clear the old build and draw every split, train first; returns split -> CSV rows."""
    for name in (out / "train.csv", out / "val.csv", out / "test.csv"):
        name.unlink(missing_ok=True)  # no CSV may name a picture of the old build
    shutil.rmtree(out / "images", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    usable = plan.usable
    popularity = Counter(name for n in usable for name in plan.scans[n].names)
    contexts = _name_contexts([plan.scans[n] for n in usable], size)
    digests: dict[str, str] = {}
    taken: set[str] = set()
    rows: dict[str, list[dict[str, str]]] = {}
    allowed: set[str] | None = None
    for split in SPLITS:
        planned = []
        for name in plan.splits[split]:
            plan.stats[name].split = split
            planned += _plan_theme(
                name, plan.scans[name], plan.stats[name], popularity, contexts, size, digests,
                taken, allowed, max_per_theme,
            )  # fmt: skip
        rows[split] = _render_split(planned, plan.stats, out, size, workers, split)
        if split == "train":
            allowed = {row["name"] for row in rows["train"]}
        if not rows[split]:
            shown = ", ".join(plan.splits[split])
            raise DataError(
                f"nothing usable in the {split} split ({shown}): no picture kept"
                + (" shares a name with the training themes" if split != "train" else "")
                + "; pick other themes with --val-themes/--test-themes or raise --max-per-theme"
            )
    return rows


def _write_tables(report: IconDatasetReport, plan: _Plan, max_per_theme: int | None) -> None:
    """stats.json and README.md, then the CSVs last: a CSV only ever names pictures on disk."""
    out, size = report.output, report.size
    stats_json = {
        "size": size,
        "max_per_theme": max_per_theme,
        "splits": {s: {"themes": plan.splits[s], "rows": len(report.rows[s])} for s in SPLITS},
        "themes": {n: s.as_json() for n, s in plan.stats.items()},
    }
    atomic_write_text(out / "stats.json", json.dumps(stats_json, indent=2, sort_keys=True) + "\n")
    argv = ["coembed data icons --output DIR", f"--size {size}"]
    argv.append(f"--themes {' '.join(plan.selected)}")
    argv += [f"--val-themes {' '.join(plan.val)}", f"--test-themes {' '.join(plan.test)}"]
    if max_per_theme is not None:
        argv.append(f"--max-per-theme {max_per_theme}")
    atomic_write_text(out / "README.md", _readme(report, " \\\n    ".join(argv)))
    for split in SPLITS:
        _write_csv(out / f"{split}.csv", report.rows[split])


def build_icon_dataset(
    output: str | os.PathLike,
    *,
    themes: Sequence[str] | None = None,
    roots: Sequence[str | os.PathLike] = (),
    size: int = 64,
    val_themes: Sequence[str] = (),
    test_themes: Sequence[str] = (),
    max_per_theme: int | None = None,
    workers: int | None = None,
) -> IconDatasetReport:
    """Build the cross-theme icon dataset in ``output`` (see the module docstring).

    Returns the report (rows per split, per-theme counts). Raises ``DataError`` for a missing
    root, a theme that is not installed or nothing usable, and ``UsageError`` for bad values.
    """
    start = time.monotonic()
    val, test = _checked_theme_options(size, max_per_theme, val_themes, test_themes)
    out = Path(output)
    _check_output(out)
    # Every check runs before the old build is touched: a refused build deletes nothing.
    plan = _scan_themes(themes, roots, size, val, test)
    _choose_splits(plan, val, test)
    workers = workers or min(os.cpu_count() or 1, 4)
    rows = _render_splits(plan, out, size, max_per_theme, workers)
    report = IconDatasetReport(out, size, plan.splits, rows, plan.stats)
    report.seconds = time.monotonic() - start
    _write_tables(report, plan, max_per_theme)
    return report
