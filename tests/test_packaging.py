"""What `pip install coembed` delivers: the wheel holds every module and asset, runs from a fresh
venv with no source tree on the path, and the core works without the optional extras.

The wheel is built from a copy of the project and installed with --no-deps into a new venv whose
only view of the dependencies is a .pth line naming this venv's site-packages (a .pth inside that
folder is not processed, so the editable install of coembed stays invisible). The extras are hidden
by a meta-path hook that makes their imports fail as if they were not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_one_line_error, build_served_index, free_port, ok

# The top-level modules of the [serve] and [onnx] extras (fastapi brings starlette and pydantic).
EXTRAS = {
    "serve": ("fastapi", "starlette", "pydantic", "uvicorn", "multipart", "python_multipart"),
    "onnx": ("onnx", "onnxruntime", "onnxscript", "onnx_ir"),
}
HIDDEN = ",".join(name for names in EXTRAS.values() for name in names)
# Imported at startup (as sitecustomize, or before the command): a module whose top-level name is
# in $COEMBED_TEST_HIDE is not found on sys.path, exactly as if it were not installed.
HIDE = """
import importlib.machinery, os, sys

HIDDEN = set(filter(None, os.environ.get("COEMBED_TEST_HIDE", "").split(",")))

class PathFinderWithout(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [
    PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
"""
PROJECT_FILES = ("pyproject.toml", "README.md")


def package_files(root: Path) -> set[str]:
    """The files of the coembed package under ``root`` (paths like ``coembed/configs/tiny.yaml``)."""
    return {
        str(p.relative_to(root))
        for p in (root / "coembed").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the project (the build writes into the tree it builds)."""
    project = tmp_path / "project"
    shutil.copytree(
        REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in PROJECT_FILES:
        shutil.copyfile(REPO / name, project / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    wheels = tmp_path / "wheels"
    ok(
        subprocess.run(
            [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
            + ["-w", str(wheels), str(project)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    (wheel,) = wheels.glob("coembed-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel, seeing this venv's dependencies; returns its bin/."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    ok(
        subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
            + ["install", "-q", "--no-deps", "--no-index", str(wheel)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    (Path(site) / "sitecustomize.py").write_text(HIDE)
    return venv / "bin"


def run(bin_dir: Path, cwd: Path, *args: str, hide: str = HIDDEN) -> subprocess.CompletedProcess:
    """Run a program of the fresh venv with the extras hidden, away from the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(COEMBED_NO_PROGRESS="1", COEMBED_TEST_HIDE=hide)
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def served_page(bin_dir: Path, cwd: Path, index: Path) -> tuple[str, str]:
    """Start `coembed serve` (extras visible) and fetch the page and its script."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.Popen(
        [str(bin_dir / "coembed"), "serve", "--index", str(index), "--port", str(port)],
        cwd=cwd,
        env={**env, "COEMBED_NO_PROGRESS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the server did not answer in 120 s"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        pages = []
        for path in ("/", "/static/app.js"):
            with urllib.request.urlopen(url + path, timeout=10) as response:
                pages.append(response.read().decode())
        return pages[0], pages[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_wheel_installs_and_runs_without_the_source_tree(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("coembed/")}
    left_out = package_files(tmp_path / "project" / "src") - shipped
    assert not left_out, f"in src/ but not in the wheel: {sorted(left_out)}"

    bin_dir = fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"
    work.mkdir()
    where = ok(run(bin_dir, work, "python", "-c", "import coembed, sys; print(coembed.__file__)"))
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent), where.stdout
    paths = ok(run(bin_dir, work, "python", "-c", "import sys; print('\\n'.join(sys.path))"))
    assert not {str(REPO), str(REPO / "src")} & set(paths.stdout.splitlines())

    assert "train" in ok(run(bin_dir, work, "coembed", "--help")).stdout
    data = ["coembed", "data", "synthetic", "--output", "data", "--n-train", "64", "--n-val", "16"]
    ok(run(bin_dir, work, *data))
    # The tiny recipe with CLIP's tokenizer: the recipe file and the tokenizer asset are read.
    tiny = ["model.image.width=8", "model.image.image_size=32", "model.text.width=32"]
    tiny += ["model.text.layers=1", "model.text.heads=2", "model.embed_dim=32"]
    tiny += ["model.image.heads=4", "model.text.context_length=16", "data.workers=0"]
    tiny += ["model.tokenizer=clip", "model.text.vocab_size=49408"]
    train = ["coembed", "train", "--config", "tiny", "--train-data", "data/train.csv"]
    train += ["--val-data", "data/val.csv", "--output", "run", "--steps", "3"]
    train += ["--batch-size", "16", "--device", "cpu", *[a for s in tiny for a in ("--set", s)]]
    ok(run(bin_dir, work, *train))
    assert json.loads((work / "run" / "summary.json").read_text())["steps"] == 3
    index = ["coembed", "index", "--model", "run", "--images", "data/images", "--output", "idx"]
    ok(run(bin_dir, work, *index, "--device", "cpu"))
    search = ["coembed", "search", "--index", "idx", "a red circle", "--k", "3", "--json"]
    hits = json.loads(ok(run(bin_dir, work, *search, "--device", "cpu")).stdout)["results"]
    assert len(hits) == 3 and all(Path(work, h["item"]).is_file() for h in hits)

    page, script = served_page(bin_dir, work, work / "idx")
    assert "<html" in page.lower() and "app.js" in page and "fetch" in script


@pytest.mark.parametrize(
    "extra, command",
    [
        ("serve", ["serve", "--index", "{index}", "--port", "{port}"]),
        ("onnx", ["export", "--onnx", "{model}", "--output", "{tmp}/onnx"]),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(extra, command, tmp_path):
    index = build_served_index(tmp_path)
    values = {"index": index, "port": free_port(), "model": tmp_path / "model", "tmp": tmp_path}
    argv = [arg.format(**values) for arg in command]
    script = f"{HIDE}\nfrom coembed.cli import main\nsys.exit(main({argv!r}))"
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**env, "COEMBED_TEST_HIDE": ",".join(EXTRAS[extra])},
        timeout=300,
    )
    assert_one_line_error(proc, contains=f"pip install coembed[{extra}]")
    assert not (tmp_path / "onnx").exists()
