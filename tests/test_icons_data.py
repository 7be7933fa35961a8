"""`coembed data icons`: the cross-theme retrieval set built from freedesktop icon themes.

Most tests run on a small theme tree written here by hand (SVGs, a .svgz, PNGs at two sizes,
symlink aliases, a broken link, an unrenderable SVG, a symbolic icon, variant themes), with the
usual icon folders pointed at empty ones so that only that tree is found. The last tests build
from the themes installed on the machine and train on the result; they skip only when fewer
than three themes are installed (CI installs four).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coembed.datasets import icons
from tests.helpers import assert_one_line_error, run_cli, train_args

RED, BLUE, GREEN, YELLOW = (220, 30, 30), (35, 65, 215), (40, 170, 50), (240, 220, 30)


# --- a theme tree written by hand ----------------------------------------------------------------


def svg(colour: tuple[int, int, int], shape: str = "circle") -> str:
    fill = "#{:02x}{:02x}{:02x}".format(*colour)
    body = {
        "circle": f'<circle cx="8" cy="8" r="7" fill="{fill}"/>',
        "square": f'<rect x="2" y="2" width="12" height="12" fill="{fill}"/>',
        "bar": f'<rect x="1" y="6" width="14" height="4" fill="{fill}"/>',
    }[shape]
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">'
        f"{body}</svg>\n"
    )


def colour_of(name: str, theme: str) -> tuple[int, int, int]:
    """A distinct colour per (theme, name), so no two pictures share bytes by accident."""
    h = hashlib.sha1(f"{theme}/{name}".encode()).digest()
    return (h[0] // 2, h[1] // 2, h[2] // 2)


def png(path: Path, colour: tuple[int, int, int], side: int) -> None:
    """A disc of ``colour`` on a transparent square."""
    yy, xx = np.mgrid[:side, :side]
    inside = (xx - side / 2 + 0.5) ** 2 + (yy - side / 2 + 0.5) ** 2 < (0.4 * side) ** 2
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[inside] = (*colour, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)


def index_theme(folder: Path, name: str, dirs: dict[str, tuple[str, int, str, int]]) -> None:
    """dirs: relative folder -> (Context, Size, Type, Scale)."""
    lines = ["[Icon Theme]", f"Name={name}", "Comment=test theme", f"Directories={','.join(dirs)}"]
    for rel, (context, size, kind, scale) in dirs.items():
        lines += ["", f"[{rel}]", f"Context={context}", f"Size={size}", f"Type={kind}"]
        lines += [f"Scale={scale}"] if scale != 1 else []
        lines += ["MinSize=8", "MaxSize=512"] if kind == "Scalable" else []
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.theme").write_text("\n".join(lines) + "\n")


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


SCALABLE = {
    "scalable/apps": ("Applications", 16, "Scalable", 1),
    "scalable/status": ("Status", 16, "Scalable", 1),
    "scalable/places": ("Places", 16, "Scalable", 1),
    "scalable/actions": ("Actions", 16, "Scalable", 1),
    "64x64/mimetypes": ("MimeTypes", 64, "Fixed", 1),
}
FOLDERS = {
    "firefox": "apps",
    "utilities-terminal": "apps",
    "folder": "places",
    "audio-volume-high": "status",
    "edit-copy": "actions",
}


def simple_theme(root: Path, theme: str, names: list[str]) -> None:
    """A theme of scalable SVGs (and a 64 px PNG for text-x-python), one colour per name."""
    index_theme(root / theme, theme, SCALABLE)
    for name in names:
        if name == "text-x-python":
            png(root / theme / "64x64/mimetypes/text-x-python.png", colour_of(name, theme), 64)
        else:
            folder = FOLDERS.get(name, "apps")
            write(root / theme / f"scalable/{folder}/{name}.svg", svg(colour_of(name, theme)))


def make_tree(root: Path) -> Path:
    """The fake icon folder; see the expected counts in test_fake_tree_counts."""
    alpha = root / "Alpha"
    index_theme(
        alpha,
        "Alpha",
        {
            "scalable/apps": ("Applications", 16, "Scalable", 1),
            "scalable/status": ("Status", 16, "Scalable", 1),
            "scalable/actions": ("Actions", 16, "Scalable", 1),
            "16x16/apps": ("Applications", 16, "Fixed", 1),
            "48x48/apps": ("Applications", 48, "Fixed", 1),
            "96x96/apps": ("Applications", 96, "Fixed", 1),
            "32x32/places": ("Places", 32, "Fixed", 1),
            "16x16@2x/apps": ("Applications", 16, "Fixed", 2),
        },
    )
    write(alpha / "scalable/apps/firefox.svg", svg(RED))  # beats the 16 px PNG
    png(alpha / "16x16/apps/firefox.png", (0, 0, 0), 16)
    (alpha / "scalable/apps/web-browser.svg").symlink_to("firefox.svg")  # an alias
    write(alpha / "scalable/apps/internet-web-browser.svg", svg(RED))  # the same bytes
    write(alpha / "scalable/status/audio-volume-high.svgz", gzip.compress(svg(GREEN).encode()))
    png(alpha / "48x48/apps/utilities-terminal.png", GREEN, 48)
    png(alpha / "96x96/apps/utilities-terminal.png", BLUE, 96)  # closest at or above 64
    png(alpha / "32x32/places/folder.png", YELLOW, 32)  # only smaller: the largest
    write(alpha / "scalable/apps/bad-app.svg", "this is not an SVG at all\n")
    (alpha / "scalable/status/network-error.svg").symlink_to("nowhere.svg")  # broken
    write(alpha / "scalable/actions/edit-copy-symbolic.svg", svg((0, 0, 0), "bar"))
    png(alpha / "16x16@2x/apps/hidpi-only.png", RED, 32)  # Scale=2: not read
    write(alpha / "unlisted/apps/unlisted.svg", svg(RED))  # not in Directories: not read

    common = ["firefox", "utilities-terminal", "folder", "edit-copy", "text-x-python"]
    simple_theme(root, "Beta", [*common, "audio-volume-high", "beta-only"])
    simple_theme(root, "Gamma", [*common, "gamma-only"])
    simple_theme(root, "Delta", ["firefox", "edit-copy", "text-x-python", "delta-only"])
    index_theme(root / "Delta", "Delta", {**SCALABLE, "32x32/places": ("Places", 32, "Fixed", 1)})
    png(root / "Delta/32x32/places/folder.png", YELLOW, 32)  # byte-identical to Alpha's

    # Midnight only links into Alpha (a variant by its files); Gamma-Dark has its own files
    # (a variant by its name).
    index_theme(root / "Midnight", "Midnight", {})
    (root / "Midnight/index.theme").write_text((alpha / "index.theme").read_text())
    for sub in ("scalable", "16x16", "48x48", "96x96", "32x32", "16x16@2x"):
        (root / "Midnight" / sub).symlink_to(f"../Alpha/{sub}")
    simple_theme(root, "Gamma-Dark", ["firefox", "folder", "gamma-only"])
    # A fallback theme: left out unless named.
    simple_theme(root, "hicolor", ["firefox", "hicolor-only"])
    return root


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> dict[str, str]:
    """Point the usual icon folders at empty ones; returns the environment for subprocesses."""
    env = {
        "HOME": str(tmp_path / "home"),
        "XDG_DATA_HOME": str(tmp_path / "home/.local/share"),
        "XDG_DATA_DIRS": str(tmp_path / "no-share"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def tree(tmp_path, isolated) -> Path:
    return make_tree(tmp_path / "themes")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- unit tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, context, caption",
    [
        ("audio-volume-high", "status", "audio volume high, status icon"),
        ("firefox", "apps", "firefox, application icon"),
        ("org.gnome.Nautilus", "apps", "nautilus, application icon"),
        ("com.github.johnfactotum.Foliate", "apps", "foliate, application icon"),
        ("gnome-terminal", "apps", "terminal, application icon"),
        ("gnome", "apps", "gnome, application icon"),  # nothing but noise: kept
        ("gtk-save", "actions", "save, action icon"),
        ("stock_mail-send", "actions", "mail send, action icon"),
        ("edit-copy", "actions", "edit copy, action icon"),
        ("folder-documents", "places", "folder documents, place icon"),
        ("user_home", "places", "user home, place icon"),
        ("drive-harddisk", "devices", "drive harddisk, device icon"),
        ("emblem-symbolic-link", "emblems", "emblem symbolic link, emblem icon"),
        ("face-smile", "emotes", "face smile, emote icon"),
        ("applications-games", "categories", "applications games, category icon"),
        ("application-x-executable", "mimetypes", "executable file, file type icon"),
        ("text-x-python", "mimetypes", "python file, file type icon"),
        ("x-office-document", "mimetypes", "office document file, file type icon"),
        ("text-plain", "mimetypes", "text file, file type icon"),
        ("image-x-generic", "mimetypes", "image file, file type icon"),
        ("image-png", "mimetypes", "png image file, file type icon"),
        ("audio-mpeg", "mimetypes", "mpeg audio file, file type icon"),
        ("application-pdf", "mimetypes", "pdf file, file type icon"),
        ("package-x-generic", "mimetypes", "package file, file type icon"),
        ("gnome-mime-application-x-tar", "mimetypes", "tar file, file type icon"),
        (
            "application-vnd.oasis.opendocument.text",
            "mimetypes",
            "oasis opendocument text file, file type icon",
        ),
        ("address-book-new", "legacy", "address book new icon"),  # no phrase for the context
    ],
)
def test_captions(name, context, caption):
    assert icons.caption_for(name, context) == caption


@pytest.mark.parametrize(
    "context, folder",
    [
        ("Applications", "apps"),
        ("MimeTypes", "mimetypes"),
        ("FileSystems", "places"),
        ("", "other"),
    ],
)
def test_context_folders(context, folder):
    assert icons.context_folder(context) == folder


@pytest.mark.parametrize(
    "name, symbolic",
    [
        ("edit-copy-symbolic", True),
        ("go-next-symbolic-rtl", True),
        ("airplane-mode-symbolic.symbolic", True),
        ("emblem-symbolic-link", False),
        ("edit-copy", False),
    ],
)
def test_symbolic_names(name, symbolic):
    assert icons.is_symbolic(name) is symbolic


def test_pick_prefers_scalable_then_closest_above_then_largest():
    def cand(size, ext=".png", scalable=False, max_size=None):
        d = icons.IconDir(f"{size}", "apps", size, scalable, max_size or size)
        return icons.Candidate(f"/t/{size}{ext}", ext, d)

    small, mid, big = cand(16), cand(96), cand(256)
    svg_fixed = cand(96, ".svg")
    scalable = cand(16, ".svg", scalable=True, max_size=512)
    up_to_32 = cand(16, ".svg", scalable=True, max_size=32)
    assert icons.pick([small, mid, big, scalable], 64) is scalable
    assert icons.pick([small, big, mid, up_to_32], 64) is mid
    assert icons.pick([mid, svg_fixed], 64) is svg_fixed  # one size: SVG before PNG
    assert icons.pick([small, up_to_32, cand(24)], 64) is up_to_32  # the largest it may draw
    assert icons.pick([small, cand(24)], 64).icon_dir.size == 24


def test_search_dirs_follow_xdg():
    env = {"HOME": "/h", "XDG_DATA_DIRS": "/a:/b"}
    assert icons.icon_search_dirs(env) == [
        Path("/h/.local/share/icons"),
        Path("/h/.icons"),
        Path("/a/icons"),
        Path("/b/icons"),
    ]
    env = {"HOME": "/h", "XDG_DATA_HOME": "/d"}
    assert icons.icon_search_dirs(env)[0] == Path("/d/icons")
    assert icons.icon_search_dirs(env)[2:] == [
        Path("/usr/local/share/icons"),
        Path("/usr/share/icons"),
    ]


def test_render_svgz_and_raster_on_white(tmp_path):
    write(tmp_path / "a.svgz", gzip.compress(svg(RED, "square").encode()))
    picture = icons.render_icon(tmp_path / "a.svgz", 64)
    assert (picture.mode, picture.size) == ("RGB", (64, 64))
    a = np.asarray(picture)
    assert tuple(a[32, 32]) == RED and tuple(a[0, 0]) == (255, 255, 255)
    png(tmp_path / "b.png", BLUE, 16)
    a = np.asarray(icons.render_icon(tmp_path / "b.png", 64))
    assert a.shape == (64, 64, 3) and tuple(a[0, 0]) == (255, 255, 255)
    assert np.abs(a[32, 32].astype(int) - BLUE).max() < 10
    write(tmp_path / "bad.svg", "<svg")
    with pytest.raises(icons.RenderError) as e:
        icons.render_icon(tmp_path / "bad.svg", 64)
    assert e.value.reason == "unrenderable"
    write(
        tmp_path / "empty.svg", '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"/>'
    )
    with pytest.raises(icons.RenderError) as e:
        icons.render_icon(tmp_path / "empty.svg", 64)
    assert e.value.reason == "blank"


# --- the fake tree -----------------------------------------------------------------------------


def test_fake_tree_counts(tree, tmp_path):
    report = icons.build_icon_dataset(tmp_path / "out", roots=[tree])
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    themes = stats["themes"]
    assert sorted(themes) == ["Alpha", "Beta", "Delta", "Gamma", "Gamma-Dark", "Midnight"]
    assert themes["Alpha"] == {
        "split": "train",
        "found": 9,  # 7 names with files, the broken link, the symbolic icon
        "kept": 4,
        "skipped": {"alias": 2, "broken_link": 1, "symbolic": 1, "unrenderable": 1},
        "files": {"broken_link": 1, "scanned": 11},
    }
    assert themes["Delta"]["kept"] == 4 and themes["Delta"]["skipped"] == {"duplicate": 1}
    assert themes["Gamma"]["split"] == "val"
    assert (themes["Gamma"]["kept"], themes["Gamma"]["skipped"]) == (5, {"not_in_training": 1})
    assert themes["Beta"]["split"] == "test"  # the most names shared with the other themes
    assert (themes["Beta"]["kept"], themes["Beta"]["skipped"]) == (6, {"not_in_training": 1})
    assert themes["Midnight"]["variant_of"] == "Alpha"  # by its files
    assert themes["Midnight"]["skipped"] == {"broken_link": 1, "symbolic": 1, "variant": 7}
    assert themes["Gamma-Dark"]["variant_of"] == "Gamma"  # by its name
    for s in themes.values():
        assert s["found"] == s["kept"] + sum(s["skipped"].values())
    assert stats["splits"] == {
        "train": {"themes": ["Alpha", "Delta"], "rows": 8},
        "val": {"themes": ["Gamma"], "rows": 5},
        "test": {"themes": ["Beta"], "rows": 6},
    }
    assert report.splits == {"train": ["Alpha", "Delta"], "val": ["Gamma"], "test": ["Beta"]}
    table = report.table()
    assert "Midnight" in table and "=Alpha" in table and "unrenderable" in table


def test_fake_tree_rows_and_pictures(tree, tmp_path):
    out = tmp_path / "out"
    icons.build_icon_dataset(out, roots=[tree])
    rows = {split: read_rows(out / f"{split}.csv") for split in ("train", "val", "test")}
    with open(out / "train.csv", newline="") as f:
        assert next(csv.reader(f)) == ["filepath", "caption", "theme", "name", "context"]
    alpha = {r["name"]: r for r in rows["train"] if r["theme"] == "Alpha"}
    assert sorted(alpha) == ["audio-volume-high", "firefox", "folder", "utilities-terminal"]
    assert alpha["firefox"]["caption"] == "firefox, application icon"  # not web-browser
    assert alpha["audio-volume-high"]["caption"] == "audio volume high, status icon"
    assert alpha["folder"] == {
        "filepath": "images/Alpha/places/folder.png",
        "caption": "folder, place icon",
        "theme": "Alpha",
        "name": "folder",
        "context": "places",
    }
    python = [r for r in rows["train"] if r["name"] == "text-x-python"]
    assert python[0]["caption"] == "python file, file type icon"
    train_names = {r["name"] for r in rows["train"]}
    for split in ("val", "test"):
        assert rows[split] and {r["name"] for r in rows[split]} <= train_names
    assert {r["theme"] for r in rows["val"]} == {"Gamma"}
    assert {r["theme"] for r in rows["test"]} == {"Beta"}

    def pixels(row):
        picture = Image.open(out / row["filepath"])
        assert (picture.mode, picture.size) == ("RGB", (64, 64))
        return np.asarray(picture).astype(int)

    for row in [r for split in rows.values() for r in split]:
        assert tuple(pixels(row)[0, 0]) == (255, 255, 255)  # alpha composited on white
    assert tuple(pixels(alpha["firefox"])[32, 32]) == RED  # the SVG, not the 16 px PNG
    assert tuple(pixels(alpha["audio-volume-high"])[32, 32]) == GREEN  # the .svgz
    centre = pixels(alpha["utilities-terminal"])[32, 32]
    assert np.abs(centre - BLUE).max() < 10  # the 96 px PNG, not the 48 px one
    assert np.abs(pixels(alpha["folder"])[32, 32] - YELLOW).max() < 10  # 32 px, scaled up
    n_images = len(list((out / "images").rglob("*.png")))
    assert n_images == sum(map(len, rows.values())) == 19


def test_fake_tree_reader_and_determinism(tree, tmp_path):
    from coembed.data.formats import read_records

    a, b = tmp_path / "a", tmp_path / "b"
    icons.build_icon_dataset(a, roots=[tree])
    icons.build_icon_dataset(b, roots=[tree])
    assert all_files(a) == all_files(b)
    records, report = read_records(str(a / "val.csv"))  # the extra columns are fine
    assert report.images == 5 and all(Path(r.image).is_file() for r in records)
    # A rebuild into the same folder replaces it, without leftovers of the first build.
    icons.build_icon_dataset(a, roots=[tree], themes=["Alpha", "Beta", "Delta"])
    assert not (a / "images" / "Gamma").exists()
    rows = [r for split in ("train", "val", "test") for r in read_rows(a / f"{split}.csv")]
    assert all((a / r["filepath"]).is_file() for r in rows)


def test_fake_tree_options(tree, tmp_path):
    report = icons.build_icon_dataset(
        tmp_path / "o1", roots=[tree], val_themes=["Delta"], test_themes=["Gamma"]
    )
    assert report.splits == {"train": ["Alpha", "Beta"], "val": ["Delta"], "test": ["Gamma"]}
    # The cap keeps the names most themes share: firefox (4 themes) and folder (4).
    report = icons.build_icon_dataset(tmp_path / "o2", roots=[tree], max_per_theme=2)
    kept = {(r["theme"], r["name"]) for split in report.rows.values() for r in split}
    assert {n for t, n in kept if t == "Alpha"} == {"firefox", "folder"}
    assert report.themes["Alpha"].skipped["max_per_theme"] == 3
    report = icons.build_icon_dataset(tmp_path / "o3", roots=[tree], size=32)
    picture = Image.open(tmp_path / "o3" / report.rows["train"][0]["filepath"])
    assert picture.size == (32, 32)
    # Naming a variant together with its theme still leaves it out; a fallback theme named
    # in --themes is used.
    report = icons.build_icon_dataset(
        tmp_path / "o4", roots=[tree], themes=["Alpha", "Midnight", "Beta", "Gamma", "hicolor"]
    )
    assert report.themes["Midnight"].variant_of == "Alpha"
    assert report.themes["hicolor"].split == "train"


def test_interrupted_rebuild_leaves_no_csv_naming_a_missing_picture(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    icons.build_icon_dataset(out, roots=[tree])
    calls = []
    render = icons._render_task

    def dies_on_the_third(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(task)

    monkeypatch.setattr(icons, "_render_task", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        icons.build_icon_dataset(out, roots=[tree], size=32)
    for split in ("train", "val", "test"):
        csv_file = out / f"{split}.csv"
        assert not csv_file.exists() or all(
            (out / r["filepath"]).is_file() for r in read_rows(csv_file)
        )
    monkeypatch.setattr(icons, "_render_task", render)
    icons.build_icon_dataset(out, roots=[tree])  # and a rerun finishes the job
    assert len(read_rows(out / "train.csv")) == 8


def test_a_theme_spread_over_two_icon_folders(tree, tmp_path, isolated):
    extra = Path(isolated["XDG_DATA_HOME"]) / "icons" / "Beta" / "scalable" / "apps"
    write(extra / "beta-extra.svg", svg(RED, "square"))  # no index.theme in this folder
    themes, _ = icons.discover_themes([tree])
    assert [f.name for f in themes["Beta"].folders] == ["Beta", "Beta"]
    scan = icons.scan_theme(themes["Beta"], icons.discover_themes([tree])[1])
    assert "beta-extra" in scan.candidates and "beta-only" in scan.candidates


def test_output_folder_with_other_files_is_refused(tree, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me\n")
    with pytest.raises(icons.UsageError, match="holds other files"):
        icons.build_icon_dataset(tmp_path / "mine", roots=[tree])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me\n"


# --- the command line --------------------------------------------------------------------------


def test_cli_fake_tree_and_bad_input(tree, tmp_path, isolated):
    out = tmp_path / "cli"
    proc = run_cli("data", "icons", "--output", str(out), "--root", str(tree), env=isolated)
    assert proc.returncode == 0, proc.stderr
    assert "broken_link" in proc.stdout and "unrenderable" in proc.stdout
    assert "rows: train 8, val 5, test 6" in proc.stdout
    assert json.loads((out / "stats.json").read_text())["themes"]["Alpha"]["kept"] == 4

    unusable = tmp_path / "unusable"
    for theme in ("E1", "E2", "E3"):
        index_theme(unusable / theme, theme, SCALABLE)
        (unusable / theme / "scalable/apps").mkdir(parents=True)
        (unusable / theme / "scalable/apps/gone.svg").symlink_to("missing.svg")
        write(unusable / theme / "scalable/apps/edit-copy-symbolic.svg", svg(RED))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--root", str(tmp_path / "nope")], 1, "nope: no such folder"),
        (["--root", str(tree), "--themes", "Alpha", "Beta", "Zeta"], 1, "found: Alpha, Beta"),
        (["--root", str(tree), "--themes", "Alpha", "Beta"], 2, "at least 3"),
        (["--root", str(unusable)], 1, "nothing usable"),
        (["--root", str(empty)], 1, "nothing usable"),
        (["--root", str(tree), "--test-themes", "Midnight"], 2, "variant of Alpha"),
        (["--root", str(tree), "--size", "4"], 2, "--size"),
        (["--root", str(tree), "--max-per-theme", "0"], 2, "--max-per-theme"),
    ]
    for args, code, contains in cases:
        proc = run_cli("data", "icons", "--output", str(tmp_path / "x"), *args, env=isolated)
        assert_one_line_error(proc, code, contains)
    proc = run_cli(
        "data", "icons", "--output", str(tmp_path / "x"), "--root", str(unusable), env=isolated
    )
    assert "symbolic 3, broken_link 3" in proc.stderr  # what was found, and why it was skipped


def test_cli_data_kinds(tmp_path):
    proc = run_cli("data", "shapes", "--output", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "s").iterdir())) == 16
    proc = run_cli("data", "icons", "--help")
    assert "most icon names" in proc.stdout and "--max-per-theme" in proc.stdout


# --- the installed themes ----------------------------------------------------------------------

# Small themes first (CI installs the first four); any three of these, or of whatever is here.
SMALL_THEMES = ("Adwaita", "Tango", "breeze", "elementary", "gnome", "oxygen", "suru", "Yaru")


def installed_themes(limit: int = 4) -> list[str]:
    """Up to ``limit`` installed themes with usable icons, the small ones first."""
    themes, roots = icons.discover_themes()
    names = [t for t in SMALL_THEMES if t in themes]
    names += [t for t in themes if t not in names and t not in icons.FALLBACK_THEMES]
    usable = []
    for name in names:
        if len(usable) < limit and icons.scan_theme(themes[name], roots).candidates:
            usable.append(name)
    return usable


def test_installed_themes_build_and_train(tmp_path):
    themes = installed_themes()
    if len(themes) < 3:
        pytest.skip(
            f"fewer than 3 icon themes installed ({', '.join(themes) or 'none'}); "
            "`apt-get install adwaita-icon-theme tango-icon-theme breeze-icon-theme` (as .ci/run)"
        )
    out = tmp_path / "icons"
    args = ["data", "icons", "--output", str(out), "--themes", *themes, "--max-per-theme", "80"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "rows: train" in proc.stdout
    from coembed.data.formats import read_records

    sizes = {}
    for split in ("train", "val", "test"):
        records, report = read_records(str(out / f"{split}.csv"))
        sizes[split] = report.images
        assert all(Path(r.image).is_file() for r in records)
    assert sizes["train"] >= 100 and sizes["val"] > 0 and sizes["test"] > 0
    rows = {split: read_rows(out / f"{split}.csv") for split in ("train", "val", "test")}
    train_names = {r["name"] for r in rows["train"]}
    for split in ("val", "test"):
        assert {r["name"] for r in rows[split]} <= train_names
        assert not {r["theme"] for r in rows[split]} & {r["theme"] for r in rows["train"]}
    assert all(Image.open(out / r["filepath"]).size == (64, 64) for r in rows["test"][:20])
    run = tmp_path / "run"
    proc = run_cli(*train_args(out / "train.csv", run, "--val-data", str(out / "val.csv"), steps=3))
    assert proc.returncode == 0, proc.stderr
    assert (run / "model.safetensors").is_file()
