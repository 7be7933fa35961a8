"""The HTTP API: results equal the in-process index's, every client mistake is a JSON 4xx, the server
keeps serving afterwards, and the real `coembed serve` answers on a loopback port."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import COLOURS, REPO, SHAPES, build_served_index, free_port


def png_bytes(size=(20, 20), colour=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def truncated_png() -> bytes:
    """The first half of a PNG of noise: a cut-off download."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "PNG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return build_served_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def index(index_dir):
    from coembed.index import Index

    return Index.load(index_dir, device="cpu")


@pytest.fixture(scope="module")
def client(index_dir):
    from fastapi.testclient import TestClient

    from coembed.serve.app import create_app

    with TestClient(create_app(index_dir)) as c:
        yield c


def assert_error(response, status: int, contains: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert contains.lower() in body["error"].lower(), body


def still_serving(client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/search", json={"text": "a red circle", "k": 3})
    assert response.status_code == 200 and len(response.json()["results"]) == 3


# --- answers -------------------------------------------------------------------------------------


def test_health(client, index):
    body = client.get("/health").json()
    assert body == {
        "status": "ok",
        "items": len(index),
        "modality": "image",
        "kind": index.kind,
        "dim": index.dim,
    }


def test_text_search_matches_the_index(client, index):
    response = client.post("/search", json={"text": "a blue square", "k": 5})
    assert response.status_code == 200
    body = response.json()
    expected = index.search("a blue square", k=5)
    assert [index.items[r["id"]] for r in body["results"]] == [item for item, _ in expected]
    np.testing.assert_allclose(
        [r["score"] for r in body["results"]], [s for _, s in expected], atol=1e-4
    )
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    first = body["results"][0]
    assert first["name"] == first["item"] == Path(index.items[first["id"]]).name
    # The image URL serves exactly the indexed file.
    image = client.get(first["url"])
    assert image.status_code == 200
    assert image.content == Path(index.items[first["id"]]).read_bytes()
    thumb = client.get(first["thumbnail"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256


def test_compositional_query_matches_the_arithmetic(client, index):
    text = '"a red circle" - "red" + "blue"'
    body = client.post("/search", json={"query": text, "k": 4}).json()
    expected = index.search(text, k=4)
    assert [index.items[r["id"]] for r in body["results"]] == [item for item, _ in expected]
    np.testing.assert_allclose(
        [r["score"] for r in body["results"]], [s for _, s in expected], atol=1e-4
    )


def test_image_terms_name_indexed_items(client, index):
    vectors = index.faiss.reconstruct_n(0, len(index))
    text_vector = index.embedder.embed_texts(["dog"])[0]
    want = vectors[3] - text_vector
    want /= np.linalg.norm(want)
    expected = index.search(want.astype(np.float32), k=3)
    for ref in ("3", f'"{Path(index.items[3]).name}"'):
        body = client.post("/search", json={"query": f'image:{ref} - "dog"', "k": 3}).json()
        found = [index.items[r["id"]] for r in body["results"]]
        assert found == [item for item, _ in expected], ref
    # A path on the server that is not an indexed item is never opened.
    assert_error(
        client.post("/search", json={"query": 'image:"/etc/hostname" + "red"'}), 400, "indexed"
    )
    for ref in (str(len(index)), "\u00b2", "../x.png"):
        assert_error(client.post("/search", json={"query": f"image:{ref}"}), 400, "indexed")


def test_more_like_this_finds_the_item_itself(client, index):
    body = client.post("/search", json={"id": 7, "k": 3}).json()
    # The tiny random model embeds these images within float32 rounding of one another, so the
    # item may tie with a neighbour for first: it is a hit at score 1, ranked as in-process.
    ids = [r["id"] for r in body["results"]]
    assert ids == index.search_ids(index.faiss.reconstruct(7).reshape(1, -1), k=3)[0]
    assert 7 in ids
    assert body["results"][ids.index(7)]["score"] == pytest.approx(1.0, abs=1e-4)
    assert_error(client.post("/search", json={"id": len(index)}), 404, "no item")


def test_image_search_json_and_upload_agree_with_the_index(client, index):
    path = Path(index.items[4])
    expected = index.search(path, k=3)  # a Path is an image, a str a text query
    by_json = client.post("/search", json={"image": b64(path.read_bytes()), "k": 3}).json()
    data_url = "data:image/png;base64," + b64(path.read_bytes())
    by_data_url = client.post("/search", json={"image": data_url, "k": 3}).json()
    by_upload = client.post(
        "/search/image",
        files={"file": (path.name, path.read_bytes(), "image/png")},
        data={"k": "3"},
    ).json()
    for body in (by_json, by_data_url, by_upload):
        assert [index.items[r["id"]] for r in body["results"]] == [item for item, _ in expected]
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_embed_matches_the_embedder(client, index):
    # Long enough to be cut at the context length, and short: the served encoder drops padding.
    texts = ["a red circle", "x", " ".join(["a green square on grey"] * 10)]
    body = client.post("/embed", json={"texts": texts}).json()
    assert body["dim"] == index.dim
    np.testing.assert_allclose(body["vectors"], index.embedder.embed_texts(texts), atol=1e-5)
    path = index.items[0]
    body = client.post("/embed", json={"images": [b64(Path(path).read_bytes())]}).json()
    np.testing.assert_allclose(body["vectors"], index.embedder.embed_images([path]), atol=1e-5)


def test_concurrent_queries_are_batched_and_each_gets_its_own_answer(client, index):
    texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 2

    def ask(text):
        return text, client.post("/search", json={"text": text + " ", "k": 2}).json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, texts))
    for text, body in answers:
        found = [index.items[r["id"]] for r in body["results"]]
        assert found == [i for i, _ in index.search(text, k=2)]


def test_openapi_schema_and_page(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/search", "/search/image", "/embed", "/images/{item_id}"} <= set(
        schema["paths"]
    )
    assert schema["paths"]["/search"]["post"]["requestBody"]
    page = client.get("/")
    assert page.status_code == 200 and 'label for="q"' in page.text
    assert '"a red circle" - "red" + "blue"' in page.text  # the syntax is documented
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "//" not in page.text.replace("http://", "").split("<body>")[0]  # no external assets


# --- mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, status, contains",
    [
        ({"text": "red", "k": 0}, 422, "k"),
        ({"text": "red", "k": 1001}, 422, "k"),
        ({"text": "red", "k": "many"}, 422, "k"),
        ({"text": "   "}, 400, "empty"),
        ({"query": ""}, 400, "empty"),
        ({"query": '"a red circle" -'}, 400, "term must follow"),
        ({"query": '"unbalanced'}, 400, "quote"),
        ({"query": '"red" - "red"'}, 400, "cancel"),
        ({}, 400, "exactly one"),
        ({"text": "red", "query": "blue"}, 400, "exactly one"),
        ({"text": "red", "colour": "blue"}, 422, "colour"),
        ({"text": 5}, 422, "text"),
        ({"text": "x" * 5000}, 422, "text"),
        ({"image": "not base64!"}, 400, "base64"),
        ({"image": b64(b"GIF89a but not really")}, 400, "not an image"),
        ({"image": b64(truncated_png())}, 400, "truncated"),
        ({"id": -1}, 422, "id"),
    ],
)
def test_client_mistakes_are_json_4xx(client, payload, status, contains):
    assert_error(client.post("/search", json=payload), status, contains)


def test_bad_bodies_and_paths(client, index):
    headers = {"content-type": "application/json"}
    assert_error(client.post("/search", content=b'{"text": "red",', headers=headers), 400, "JSON")
    assert_error(client.post("/search", content=b"\xff\xfe", headers=headers), 400, "JSON")
    assert_error(client.post("/search", json=["red"]), 422, "")
    assert_error(client.post("/embed", json={"texts": []}), 422, "texts")
    assert_error(client.post("/embed", json={"texts": ["a"] * 257}), 422, "texts")
    assert_error(client.post("/embed", json={}), 400, "exactly one")
    # Ids map to the index's own paths: nothing else is reachable through /images.
    for path in ("/images/-1", f"/images/{len(index)}"):
        assert_error(client.get(path), 404, "no item")
    # A URL that names no item is a 404, whether its id is out of range or not a number at all.
    for path in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", "/thumbnails/%2F"):
        response = client.get(path)
        assert_error(response, 404, "")
        assert "root:" not in response.text
    for path in ("/images/x", "/thumbnails/1.5"):
        assert_error(client.get(path), 404, "no item")
    assert_error(client.get("/images/../../etc/passwd"), 404, "")
    assert_error(client.get("/nothing-here"), 404, "")
    assert_error(client.get("/search"), 405, "")
    still_serving(client)


def test_bad_uploads(client):
    upload = client.post(
        "/search/image", files={"file": ("notes.txt", b"hello, not an image", "text/plain")}
    )
    assert_error(upload, 400, "not an image")
    cut = client.post("/search/image", files={"file": ("cut.png", truncated_png(), "image/png")})
    assert_error(cut, 400, "truncated")
    assert_error(client.post("/search/image", files={"file": ("e.png", b"", "image/png")}), 400)
    assert_error(client.post("/search/image", data={"k": "3"}), 422, "file")
    assert_error(
        client.post("/search/image", files={"file": ("a.png", png_bytes())}, data={"k": "0"}),
        422,
        "k",
    )
    broken = client.post(
        "/search/image",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert_error(broken, 422, "file")
    still_serving(client)


def test_limits_on_body_and_pixels(index_dir):
    from fastapi.testclient import TestClient

    from coembed.serve.app import create_app

    with TestClient(create_app(index_dir, max_body_bytes=20_000, max_pixels=10_000)) as small:
        big = png_bytes(size=(200, 200))  # 40,000 pixels, a small file
        assert_error(small.post("/search", json={"image": b64(big)}), 413, "pixels")
        upload = small.post("/search/image", files={"file": ("big.png", big, "image/png")})
        assert_error(upload, 413, "pixels")
        noise = np.random.default_rng(0).integers(0, 255, (100, 100, 3), np.uint8)
        out = io.BytesIO()
        Image.fromarray(noise).save(out, "PNG")  # ~30 KB of incompressible pixels
        assert_error(small.post("/search", json={"image": b64(out.getvalue())}), 413, "limit")
        upload = small.post("/search/image", files={"file": ("noise.png", out.getvalue())})
        assert_error(upload, 413, "limit")

        def chunks():  # no Content-Length: the limit must hold while streaming too
            yield b'{"text": "'
            for _ in range(30):
                yield b"x" * 1000
            yield b'"}'

        streamed = small.post(
            "/search", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_error(streamed, 413, "limit")
        still_serving(small)


# --- the real server -----------------------------------------------------------------------------


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the server did not come up")


def test_coembed_serve_on_a_loopback_port(index_dir, index):
    import asyncio

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coembed",
            "serve",
            "--index",
            str(index_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COEMBED_NO_PROGRESS": "1"},
    )
    try:
        wait_for_health(url, proc)
        texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 3

        async def many():
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                return await asyncio.gather(
                    *(http.post("/search", json={"text": t, "k": 3}) for t in texts)
                )

        answers = asyncio.run(many())
        for text, response in zip(texts, answers):
            assert response.status_code == 200
            assert [index.items[r["id"]] for r in response.json()["results"]] == [
                i for i, _ in index.search(text, k=3)
            ]
        bad = httpx.post(
            url + "/search", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and "error" in bad.json()
        huge = httpx.post(url + "/search", content=b"x" * (17 << 20))
        assert huge.status_code == 413
        assert httpx.get(url + "/health").json()["items"] == len(index)
        assert httpx.get(url + "/").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_missing_index_before_opening_the_port(tmp_path):
    from coembed.errors import IndexError_
    from coembed.serve.app import serve

    # The CLI turns this CoembedError into one line and exit code 1.
    with pytest.raises(IndexError_, match="no such index directory"):
        serve(tmp_path / "nope", port=free_port())
