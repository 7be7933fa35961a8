"""What a user of `coembed serve` and `coembed search` meets: a port in use is one error line,
results name files relative to the indexed folder (absolute paths only when the operator asks),
and the command line takes the queries the web page takes (image:ID, unquoted words)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    assert_one_line_error,
    free_port,
    make_images,
    ok,
    run_cli,
    run_cli_batch,
    tiny_clip_model,
)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """An index of the twelve test images twice, in photos/a and photos/b (same file names)."""
    from coembed.checkpoint import save_model_dir
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("ux")
    for part in ("a", "b"):
        make_images(root / "photos" / part)
    model_dir = save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=16), root / "model")
    index = Index.build(load(model_dir, device="cpu"), images=root / "photos", progress=False)
    return index.save(root / "index")


@pytest.fixture(scope="module")
def index(index_dir):
    from coembed.index import Index

    return Index.load(index_dir, device="cpu")


def client_for(index_dir: Path, **options):
    from fastapi.testclient import TestClient

    from coembed.serve.app import create_app

    return TestClient(create_app(index_dir, **options))


# --- serve: the port ------------------------------------------------------------------------------


def test_serve_on_a_port_in_use_is_one_error_line(index_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--index", str(index_dir), "--port", str(port), "--device", "cpu")
    assert_one_line_error(proc, 1, f"port {port} on 127.0.0.1 is in use")
    assert "serving" not in proc.stdout  # no banner for a server that never ran


def test_check_can_listen(monkeypatch):
    from coembed.errors import CoembedError
    from coembed.serve.app import check_can_listen

    check_can_listen("127.0.0.1", free_port())  # a free port passes
    with pytest.raises(CoembedError, match="cannot listen there"):
        check_can_listen("no-such-host.invalid", free_port())


def test_serve_show_paths_reaches_the_app(index_dir, monkeypatch, capsys):
    import uvicorn

    from coembed.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    base = ["serve", "--index", str(index_dir), "--port", str(free_port()), "--device", "cpu"]
    assert main(base) == 0 and main([*base, "--show-paths"]) == 0
    assert [app.state.service.show_paths for app in apps] == [False, True]
    assert capsys.readouterr().out.count("coembed: serving 24 items") == 2


# --- serve: what results name ---------------------------------------------------------------------


def test_results_name_files_relative_to_the_indexed_folder(index_dir, index):
    root = index_dir.parent / "photos"
    with client_for(index_dir) as client:
        response = client.post("/search", json={"text": "a red circle", "k": 24})
        assert response.status_code == 200
        rows = response.json()["results"]
        assert len(rows) == 24
        for row in rows:
            relative = str(Path(index.items[row["id"]]).relative_to(root))
            assert row["item"] == row["name"] == relative  # "a/red_circle.png"
        assert str(index_dir.parent) not in response.text  # no server path at all
        # An image term names an item by id or by its name in results, never by a server path.
        name = rows[0]["name"]
        by_name = client.post("/search", json={"query": f'image:"{name}"', "k": 1}).json()
        assert by_name["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        absolute = client.post("/search", json={"query": f'image:"{index.items[rows[0]["id"]]}"'})
        assert absolute.status_code == 400 and "indexed" in absolute.json()["error"]


def test_show_paths_opts_in_to_absolute_paths(index_dir, index):
    with client_for(index_dir, show_paths=True) as client:
        rows = client.post("/search", json={"text": "a red circle", "k": 5}).json()["results"]
        assert [row["item"] for row in rows] == [index.items[row["id"]] for row in rows]
        assert all(Path(row["item"]).is_absolute() for row in rows)
        assert rows[0]["name"] == str(
            Path(rows[0]["item"]).relative_to(index_dir.parent / "photos")
        )
        absolute = client.post("/search", json={"query": f'image:"{rows[0]["item"]}"', "k": 1})
        assert absolute.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


# --- search: the query forms of the web page ------------------------------------------------------


def hits(proc) -> list[str]:
    return [hit["item"] for hit in json.loads(ok(proc).stdout)["results"]]


def test_search_takes_unquoted_words_and_image_ids(index_dir, index):
    search = ["search", "--index", str(index_dir), "--device", "cpu", "--json", "--k", "5"]
    procs = run_cli_batch(
        [
            [*search, "a", "blue", "circle"],
            [*search, "a", "red", "circle", "-", "red", "+", "blue"],
            [*search, "image:3", "-", "red"],
            [*search, "image:3"],
            [*search, "image:24"],
        ]
    )
    assert hits(procs[0]) == [item for item, _ in index.search("a blue circle", k=5)]
    swap = index.search('"a red circle" - "red" + "blue"', k=5)
    assert hits(procs[1]) == [item for item, _ in swap]
    # image:3 is item 3's stored vector, as the server takes it.
    want = index.faiss.reconstruct(3) - index.embedder.embed_texts(["red"])[0]
    edited = index.search((want / np.linalg.norm(want)).astype(np.float32), k=5)
    assert hits(procs[2]) == [item for item, _ in edited]
    first = json.loads(procs[3].stdout)["results"][0]
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert_one_line_error(procs[4], 2, "the index has items 0 to 23")


def test_shell_words_become_the_query():
    from coembed.index.query import Query, Term, command_line_query

    def terms(*words):
        return command_line_query(list(words)).terms

    assert command_line_query(["a", "blue", "circle"]) == Query(
        (Term(1.0, "text", "a blue circle"),)
    )
    assert terms("a", "red", "circle", "-", "red", "+", "blue") == (
        Term(1.0, "text", "a red circle"),
        Term(-1.0, "text", "red"),
        Term(1.0, "text", "blue"),
    )
    assert terms("0.5*red", "square", "+", "0.5*blue", "circle") == (
        Term(0.5, "text", "red square"),
        Term(0.5, "text", "blue circle"),
    )
    assert terms("image:3", "-", "cat", "+", "dog") == (
        Term(1.0, "image", "3"),
        Term(-1.0, "text", "cat"),
        Term(1.0, "text", "dog"),
    )
    assert terms("a", "beach", "*", "2", "+", "sunset") == (
        Term(2.0, "text", "a beach"),
        Term(1.0, "text", "sunset"),
    )
    # A hyphen inside a word is text, not an operator.
    assert terms("a", "red", "t-shirt") == (Term(1.0, "text", "a red t-shirt"),)


def test_an_indexed_path_whose_file_is_gone_is_that_item(index, tmp_path):
    from coembed.index.index import item_vectors
    from coembed.index.query import parse_query

    gone = index.items[5] + ".moved"
    index.items[5], kept = gone, index.items[5]
    try:
        vectors = item_vectors(parse_query(f'image:"{gone}" + image:7'), index)
    finally:
        index.items[5] = kept
    np.testing.assert_array_equal(vectors[gone], index.faiss.reconstruct(5))
    np.testing.assert_array_equal(vectors["7"], index.faiss.reconstruct(7))
    assert item_vectors(parse_query(f'image:"{kept}"'), index) == {}  # a file: embedded as one
