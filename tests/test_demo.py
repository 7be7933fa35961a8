"""``coembed demo``: it writes only to a folder of its own, and its showcase is judged honestly.

The run folder is new, empty, or an earlier demo run replaced with ``--overwrite`` (what
``make demo`` passes); a training run or any other folder is refused, and a failed overwrite
puts the earlier run back. Every showcase search's top hit is checked against the attributes
its query asks for, read back from the synthetic captions; those readings are checked here
against the generator's own scenes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
from dataclasses import astuple
from pathlib import Path

import pytest

from coembed.datasets.synthetic import POSITION_XY, SIZE_RADIUS, _rng, scene
from coembed.datasets.synthetic_words import describe, differences
from tests.helpers import (
    REPO,
    TINY_SET,
    assert_one_line_error,
    ok,
    run_cli_batch,
    tiny_dataset,
    write_csv,
)

# The demo's training at the tiny test shapes: two steps of 16.
TINY_DEMO = ["--steps", "2", "--device", "cpu", "--set", "train.batch_size=16"]
TINY_DEMO += [arg for pair in TINY_SET for arg in ("--set", pair)]
SEARCHES = 7  # five text searches, one image search, one compositional search


@pytest.fixture
def demo_data(tmp_path) -> Path:
    """A folder with train.csv (32 shipped pairs) and val.csv (12), images beside them."""
    folder = tmp_path / "data"
    tiny_dataset(folder, 32, "train")
    tiny_dataset(folder, 12, "val")
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (and the folder's hidden siblings) with its sha256."""
    files = sorted(p for p in folder.parent.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def earlier_demo_run(folder: Path) -> Path:
    """A folder as an earlier demo run leaves it (the demo's mark and a weights file)."""
    folder.mkdir(parents=True)
    (folder / "demo.json").write_text(json.dumps({"made_by": "coembed demo", "finished": True}))
    (folder / "model.safetensors").write_bytes(b"the earlier demo's weights")
    return folder


def make_demo_command() -> list[str]:
    """The arguments ``make demo`` gives ``coembed`` (read from the Makefile's demo recipe)."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.+)$", text, re.M).group(1)
    words = shlex.split(recipe)
    return words[[i for i, w in enumerate(words) if w.endswith("coembed")][0] + 1 :]


def test_demo_refuses_folders_it_did_not_make(tmp_path, demo_data):
    training_run = tmp_path / "runs" / "mine"
    training_run.mkdir(parents=True)
    (training_run / "run_config.json").write_text("{}")
    (training_run / "model.safetensors").write_bytes(b"weights of a week of training")
    other = tmp_path / "runs" / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    earlier = earlier_demo_run(tmp_path / "runs" / "demo")
    a_file = tmp_path / "runs" / "file"
    a_file.write_text("not a folder")
    before = snapshot(training_run)
    # Refused before anything is read or trained, whatever the other options say.
    demo = ["demo", "--data", str(demo_data), "--steps", "1", "--device", "cpu", "--output"]
    procs = run_cli_batch(
        [
            [*demo, str(training_run)],
            [*demo, str(training_run), "--overwrite"],
            [*demo, str(other), "--overwrite"],
            [*demo, str(earlier)],
            [*demo, str(a_file)],
        ]
    )
    for proc in procs[:3]:
        assert_one_line_error(proc, 2, "holds files the demo did not make")
    assert_one_line_error(procs[3], 2, "holds an earlier demo run; add --overwrite")
    assert_one_line_error(procs[4], 2, "is a file")
    assert snapshot(training_run) == before  # nothing written, moved or deleted anywhere


def test_failed_overwrite_puts_the_earlier_run_back(tmp_path, demo_data):
    earlier = earlier_demo_run(tmp_path / "runs" / "demo")
    write_csv(demo_data / "val.csv", [])  # a header and no pairs: training stops at the start
    before = snapshot(earlier)
    (proc,) = run_cli_batch(
        [["demo", "--data", str(demo_data), *TINY_DEMO, "--output", str(earlier), "--overwrite"]]
    )
    assert_one_line_error(proc, 1, "val.csv")
    assert snapshot(earlier) == before  # the earlier run is back, nothing left beside it


def read_back(n: int = 2000) -> list[tuple[list, str, object]]:
    """(objects drawn, caption, description read back) for n generated scenes."""
    out = []
    for i in range(n):
        things, caption = scene(_rng(0, 0, i))
        out.append((things, caption, describe(caption)))
    return out


def test_captions_read_back_what_the_generator_drew():
    for things, caption, found in read_back():
        assert found is not None, caption
        found = found.as_picture()
        if found.relation:  # a pair: found.things[0] is left of / above found.things[1]
            # The two differ in shape or colour, so those pick out which drawn object is which.
            first = next(t for t in things if (t.shape, t.colour) == astuple(found.things[0])[:2])
            second = next(t for t in things if t is not first)
            axis = "x" if found.relation == "left of" else "y"
            assert getattr(first, axis) < getattr(second, axis), caption
            drawn = [first, second]
        else:
            assert len(things) == found.count, caption
            drawn = things[:1]
        for thing, said in zip(drawn, found.things):
            assert (thing.shape, thing.colour, thing.texture) == (
                said.shape,
                said.colour,
                said.texture,
            ), caption
        if found.position is not None:
            (thing,) = things
            nearest = min(POSITION_XY, key=lambda p: math.dist(POSITION_XY[p], (thing.x, thing.y)))
            assert nearest == found.position, caption
            lo, hi = SIZE_RADIUS[found.things[0].size]
            assert lo <= thing.radius <= hi, caption


def test_judging_a_hit_by_the_query_attributes():
    def judged(query: str, caption: str) -> list[str]:
        return differences(describe(query), describe(caption).as_picture())

    # The example that prompted this: yellow squares ranked first for a yellow star.
    assert judged(
        "a yellow star on the left", "there is a big yellow box with dots on the left"
    ) == ["square, not star"]
    assert judged("a yellow star on the left", "a small yellow star at the left") == []
    assert judged("a yellow star on the left", "a small yellow star near the top") == [
        "top, not left"
    ]
    # The same pair said the other way round is the same picture; the swapped pair is not.
    query = "a green triangle above a purple hexagon"
    assert judged(query, "a picture of a violet hexagon beneath a green striped triangle") == []
    assert judged(query, "a purple hexagon above a green triangle") == [
        "purple, not green",
        "hexagon, not triangle",
        "green, not purple",
        "triangle, not hexagon",
    ]
    assert judged("two blue squares", "there are 3 blue boxes") == ["three alike, not two alike"]
    assert judged("two blue squares", "a pair of blue plain squares") == []
    assert judged("a striped orange cross in the middle", "an orange cross at the center") == [
        "solid, not striped"
    ]
    assert judged("a large blue circle", "a large red circle in the middle") == ["red, not blue"]
    assert describe("a red car") is None  # not the generator's words: cannot be judged


def test_demo_judges_its_showcase_over_an_earlier_run(tmp_path, demo_data):
    """The Makefile's demo command over an earlier demo run: replaced, showcase judged."""
    run = earlier_demo_run(tmp_path / "runs" / "demo")
    args = [*make_demo_command(), "--output", str(run), "--data", str(demo_data), *TINY_DEMO]
    (proc,) = run_cli_batch([args])
    ok(proc)
    verdicts = re.findall(r"^  top hit right: (yes|no|cannot tell)", proc.stdout, re.M)
    assert len(verdicts) == SEARCHES, proc.stdout
    right = verdicts.count("yes")
    summary = json.loads((run / "demo.json").read_text())
    showcase = summary["showcase"]
    assert summary["made_by"] == "coembed demo" and summary["finished"] is True
    assert showcase["judged"] == SEARCHES - verdicts.count("cannot tell") == SEARCHES
    assert showcase["top_hits_right"] == right
    assert showcase["accuracy"] == pytest.approx(right / SEARCHES)
    assert f"showcase: {right} of {SEARCHES} top hits show what their query asks for" in (
        proc.stdout
    )
    assert [s["top_hit_right"] for s in showcase["searches"]] == [v == "yes" for v in verdicts]
    for search in showcase["searches"]:
        assert bool(search["differences"]) == (search["top_hit_right"] is False)
    assert json.loads((run / "summary.json").read_text())["showcase"] == showcase
    assert f"{right} of {SEARCHES} top hits" in (run / "report" / "showcase.txt").read_text()
    assert (run / "report" / "searches.png").stat().st_size > 0
    assert (run / "model.safetensors").read_bytes() != b"the earlier demo's weights"
    assert not list(run.parent.glob(".demo.*"))  # the earlier run, replaced, is gone


@pytest.mark.slow
def test_make_demo_twice(tmp_path, demo_data):
    """``make demo`` run twice from nothing: the second run replaces the first."""
    run = tmp_path / "runs" / "demo"
    args = [*make_demo_command(), "--output", str(run), "--data", str(demo_data), *TINY_DEMO]
    first, second = run_cli_batch([args, args])
    assert "run folder" in ok(first).stdout and "run folder" in ok(second).stdout
    assert json.loads((run / "demo.json").read_text())["finished"] is True
    assert not list(run.parent.glob(".demo.*"))
