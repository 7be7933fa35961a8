"""Retrieval recall@K (hand-written, brute force, open_clip) and zero-shot classification."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from coembed.errors import UsageError
from coembed.evaluate import (
    DEFAULT_TEMPLATES,
    caption_ids_of,
    evaluate_retrieval,
    format_zeroshot,
    read_templates,
    retrieval_metrics,
    zeroshot_classifier,
    zeroshot_scores,
)
from tests.helpers import SHIPPED, copy_images, shipped_rows, write_csv

KEYS = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_force(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict:
    """Sort everything, then find the first correct item: the definition, written plainly."""
    scores = image_emb @ text_emb.T
    out = {}
    i2t = []
    for i in range(len(image_emb)):
        own = set(np.flatnonzero(text_to_image == i))
        if own:
            order = np.argsort(-scores[i])
            i2t.append(next(r for r, t in enumerate(order) if t in own))
    t2i = [list(np.argsort(-scores[:, t])).index(text_to_image[t]) for t in range(len(text_emb))]
    for k in ks:
        out[f"image_to_text_R@{k}"] = np.mean(np.array(i2t) < k)
    for k in ks:
        out[f"text_to_image_R@{k}"] = np.mean(np.array(t2i) < k)
    return out


def test_hand_written_matrix_with_two_captions_for_one_image():
    images = np.eye(3, dtype=np.float32)
    texts = np.array(
        [
            [0.9, 0.1, 0.0],  # image 0: its best caption
            [0.0, 0.0, 1.0],  # image 0 as well, but closest to image 2
            [0.8, 0.6, 0.0],  # image 1, ranked behind image 0
            [0.0, 0.1, 0.9],  # image 2, and image 2's only caption
        ],
        np.float32,
    )
    t2i = np.array([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, t2i, ks=(1, 2, 3))
    # image->text: image 0 hits via caption 0; image 1's caption 2 wins its row; image 2's
    # caption 3 (0.9) is beaten by caption 1 (1.0) -> rank 1.
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@2"] == 1.0
    # text->image ranks: 0, 2 (ties at 0 with image 1 count against), 1, 0.
    assert m["text_to_image_R@1"] == 0.5
    assert m["text_to_image_R@2"] == 0.75
    assert m["text_to_image_R@3"] == 1.0
    assert (m["images"], m["captions"]) == (3, 4)
    # 1-based: image->text ranks 1, 1, 2; text->image ranks 1, 3, 2, 1 (median of 0-based
    # 0, 0, 1, 2 is 0.5, rounded down as open_clip does).
    assert m["image_to_text_median_rank"] == 1.0
    assert m["image_to_text_mean_rank"] == pytest.approx(4 / 3)
    assert m["text_to_image_median_rank"] == 1.0
    assert m["text_to_image_mean_rank"] == pytest.approx(7 / 4)


def test_ranks_of_a_hand_made_similarity_matrix():
    """Each text's image is at a known place in its row: ranks 1, 2, 3, 3, 5 (1-based)."""
    images = np.eye(5, dtype=np.float32)
    scores = np.array(
        [  # text t's similarity to each image; its true image is image t
            [0.9, 0.1, 0.2, 0.0, 0.3],  # rank 1
            [0.8, 0.5, 0.1, 0.0, 0.2],  # rank 2 (image 0 ahead)
            [0.7, 0.6, 0.4, 0.0, 0.1],  # rank 3 (images 0, 1 ahead)
            [0.9, 0.0, 0.0, 0.5, 0.6],  # rank 3 (images 0, 4 ahead)
            [0.9, 0.8, 0.7, 0.6, 0.5],  # rank 5 (all four ahead)
        ],
        np.float32,
    )
    m = retrieval_metrics(images, scores, np.arange(5))
    assert m["text_to_image_median_rank"] == 3.0
    assert m["text_to_image_mean_rank"] == pytest.approx((1 + 2 + 3 + 3 + 5) / 5)
    # image->text reads the columns, ties counting against: image 0's own 0.9 ties with texts
    # 3 and 4 (rank 3), image 1's 0.5 is beaten by 0.6 and 0.8 (rank 3), images 2, 3 and 4 by
    # one text each (rank 2).
    assert m["image_to_text_mean_rank"] == pytest.approx((3 + 3 + 2 + 2 + 2) / 5)
    assert m["image_to_text_median_rank"] == 2.0


def test_image_without_captions_is_not_counted():
    images = np.eye(3, dtype=np.float32)
    texts = np.eye(3, dtype=np.float32)[:2]
    m = retrieval_metrics(images, texts, np.array([0, 1]))
    assert m["images"] == 2 and m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0


def test_ties_count_against_the_model():
    same = np.ones((4, 8), np.float32)
    m = retrieval_metrics(same, same, np.arange(4), ks=(1, 4))
    assert m["image_to_text_R@1"] == 0.0 and m["text_to_image_R@1"] == 0.0
    assert m["image_to_text_R@4"] == 1.0 and m["text_to_image_R@4"] == 1.0


def random_images(seed: int, n_img: int, dim: int, extra: int):
    """A seeded generator, (n_img, dim) unit images and the image of each of n_img + extra
    captions (every image one, ``extra`` more at random)."""
    rng = np.random.default_rng(seed)
    images = unit(rng.normal(size=(n_img, dim)))
    return rng, images, np.concatenate([np.arange(n_img), rng.integers(0, n_img, extra)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_several_captions_per_image(seed):
    rng, images, t2i = random_images(seed, 60, 16, 90)  # 1 to ~5 captions each
    dim = images.shape[1]
    texts = unit(images[t2i] + rng.normal(scale=1.2, size=(len(t2i), dim)))
    got = retrieval_metrics(images, texts, t2i)
    want = brute_force(images, texts, t2i)
    assert [got[k] for k in KEYS] == pytest.approx([want[k] for k in KEYS])
    assert 0 < got["text_to_image_R@1"] < 1  # the noise leaves something to get wrong


def test_matches_open_clip_get_clip_metrics():
    from open_clip_train.train import get_clip_metrics

    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(80, 24)))
    texts = unit(images + rng.normal(scale=1.0, size=images.shape))
    ours = retrieval_metrics(images, texts, np.arange(80))
    theirs = get_clip_metrics(torch.from_numpy(images), torch.from_numpy(texts), 1.0)
    ranks = [
        f"{d}_{r}_rank" for d in ("image_to_text", "text_to_image") for r in ("median", "mean")
    ]
    assert [ours[k] for k in KEYS + ranks] == pytest.approx(
        [float(theirs[k]) for k in KEYS + ranks]
    )
    assert ours["text_to_image_mean_rank"] > 1  # the noise leaves something to get wrong


def brute_force_by_caption(image_emb, text_emb, text_to_image, captions, k=1) -> tuple:
    """Recall@k both ways when captions of one text are one caption, written plainly: an image
    ranks the caption texts, a caption's targets are every image that has it."""
    scores = image_emb @ text_emb.T
    texts_of = {}
    for t, c in enumerate(captions):
        texts_of.setdefault(c, set()).add(t)
    names = sorted(texts_of)
    i2t_hits, t2i_hits = [], []
    for i in range(len(image_emb)):
        own = {captions[t] for t in np.flatnonzero(text_to_image == i)}
        if own:
            # Each caption text once, scored by its best row.
            best = [max(scores[i, t] for t in texts_of[c]) for c in names]
            i2t_hits.append(any(names[c] in own for c in np.argsort(best)[::-1][:k]))
    for t in range(len(text_emb)):
        targets = {int(text_to_image[u]) for u in texts_of[captions[t]]}
        t2i_hits.append(any(i in targets for i in np.argsort(-scores[:, t])[:k]))
    return float(np.mean(i2t_hits)), float(np.mean(t2i_hits))


def test_captions_of_one_text_are_one_caption():
    """Four pictures, two of "cat" and two of "dog", by a model that knows cats from dogs and
    nothing more: every cat picture and both "cat" rows embed to one point. Counted by row, no
    picture could find its own "cat" row ahead of the other (a tie) and half the captions
    would miss; as one caption per text, everything is found."""
    cat, dog = [1.0, 0.0], [0.0, 1.0]
    images = np.array([cat, cat, dog, dog], np.float32)
    texts = images.copy()
    captions = ["cat", "cat", "dog", "dog"]
    by_row = retrieval_metrics(images, texts, np.arange(4), ks=(1, 2))
    assert by_row["image_to_text_R@1"] == 0.0 and by_row["image_to_text_R@2"] == 1.0
    assert by_row["text_to_image_R@1"] == 0.0
    ids = caption_ids_of(captions)
    assert ids.tolist() == [0, 0, 1, 1]
    m = retrieval_metrics(images, texts, np.arange(4), ks=(1, 2), caption_ids=ids)
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0
    assert m["image_to_text_mean_rank"] == 1.0 and m["text_to_image_mean_rank"] == 1.0
    # Ties with pictures of other captions still count against the model.
    same = np.ones((4, 2), np.float32)
    collapsed = retrieval_metrics(same, same, np.arange(4), ks=(1, 2), caption_ids=ids)
    assert collapsed["image_to_text_R@1"] == 0.0 and collapsed["text_to_image_R@2"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_captions_match_brute_force(seed):
    """Random embeddings, 1-3 captions per image drawn from 25 texts (most repeat)."""
    rng, images, t2i = random_images(seed, 50, 12, 40)
    dim = images.shape[1]
    vocabulary = [f"thing {i}" for i in range(25)]
    captions = [vocabulary[i] for i in rng.integers(0, 25, len(t2i))]
    word = {w: unit(rng.normal(size=dim)) for w in vocabulary}
    texts = unit(np.stack([word[c] for c in captions]) + 0.5 * images[t2i])
    got = retrieval_metrics(images, texts, t2i, ks=(1, 5), caption_ids=caption_ids_of(captions))
    for k in (1, 5):
        want = brute_force_by_caption(images, texts, t2i, captions, k)
        assert (got[f"image_to_text_R@{k}"], got[f"text_to_image_R@{k}"]) == pytest.approx(want)
    assert 0 < got["text_to_image_R@1"] < 1  # the noise leaves something to get wrong


def test_eval_counts_repeated_captions(tmp_path, tiny_model_dir):
    """A dataset whose six pictures share three captions: ``evaluate_retrieval`` says how many
    rows repeat a caption and scores them as one caption each."""
    import coembed

    rows = shipped_rows(6)
    copy_images(rows, tmp_path / "images")
    names = ["a red thing", "a red thing", "a blue thing", "a blue thing", "a dot", "a square"]
    data = write_csv(tmp_path / "pairs.csv", [(f"images/{n}", c) for (n, _), c in zip(rows, names)])
    got = evaluate_retrieval(tiny_model_dir, data, device="cpu")
    assert got["repeated_captions"] == 4 and got["captions"] == 6
    model = coembed.load(tiny_model_dir, device="cpu")
    images = model.embed_images([tmp_path / "images" / n for n, _ in rows])
    texts = model.embed_texts(names)
    want = retrieval_metrics(images, texts, np.arange(6), caption_ids=caption_ids_of(names))
    assert [got[k] for k in KEYS] == pytest.approx([want[k] for k in KEYS], abs=1e-6)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((3, 4)), np.zeros((2, 5)), np.array([0, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((3, 4)), np.zeros((2, 4)), np.array([0, 3]))


# --- zero-shot -----------------------------------------------------------------------------------


class HashEmbedder:
    """Texts -> fixed random vectors (not unit), so the test sees the normalization happen."""

    dim = 8

    def embed_texts(self, texts):
        return np.stack(
            [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) * 3 for t in texts]
        ).astype(np.float32)


def test_classifier_is_renormalized_mean_of_normalized_templates():
    emb = HashEmbedder()
    templates = ["a {}.", "a photo of a {}.", "{} here"]
    got = zeroshot_classifier(emb, ["cat", "dog"], templates)
    for row, name in zip(got, ["cat", "dog"]):
        want = unit(unit(emb.embed_texts([t.format(name) for t in templates])).mean(0))
        np.testing.assert_allclose(row, want, atol=1e-6)


def test_zeroshot_scores_top1_top5_and_confusions():
    classifier = np.eye(6, dtype=np.float32)
    images = np.array(
        [[1, 0.5, 0, 0, 0, 0], [0.2, 1, 0, 0, 0, 0], [0, 0.9, 0.1, 0, 0, 0]], np.float32
    )
    result = zeroshot_scores(images, np.array([0, 1, 2]), classifier, list("abcdef"))
    assert result["top1"] == pytest.approx(2 / 3) and result["top5"] == 1.0
    row_c = result["per_class"][2]
    assert row_c["top1"] == 0.0 and row_c["most_confused_with"] == "b"
    assert "most confused" in format_zeroshot({**result, "templates": 1})


def test_templates_file(tmp_path):
    assert read_templates(None) == list(DEFAULT_TEMPLATES)
    good = tmp_path / "t.txt"
    good.write_text("a {}\n\nan image of {}\n")
    assert read_templates(good) == ["a {}", "an image of {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder\n")
    with pytest.raises(UsageError, match="no {}"):
        read_templates(bad)


# --- the real command, in process ----------------------------------------------------------------


def test_cli_eval_matches_library_and_skips_broken_images(tmp_path, tiny_model_dir, capsys):
    import coembed
    from coembed.cli import main

    rows = list(csv.DictReader(open(SHIPPED / "val.csv")))[:12]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for r in rows:
            w.writerow([str(SHIPPED / r["filepath"]), r["caption"]])
        w.writerow([str(SHIPPED / rows[0]["filepath"]), "a second caption for the first image"])
        w.writerow([str(tmp_path / "broken.png"), "this image cannot be decoded"])
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(tmp_path / "pairs.csv"),
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(KEYS) <= set(out)
    assert (out["images"], out["captions"], out["skipped_images"]) == (12, 13, 1)

    model = coembed.load(tiny_model_dir, device="cpu")
    images = model.embed_images([str(SHIPPED / r["filepath"]) for r in rows])
    texts = model.embed_texts(
        [r["caption"] for r in rows] + ["a second caption for the first image"]
    )
    want = retrieval_metrics(images, texts, np.array([*range(12), 0]))
    assert [out[k] for k in KEYS] == pytest.approx([want[k] for k in KEYS], abs=1e-6)


def test_cli_zeroshot(tmp_path, tiny_model_dir, capsys):
    import coembed
    from coembed.cli import main

    shapes = SHIPPED.parent / "shapes"
    classes = ["blue star", "red circle", "yellow square"]
    for name in classes:
        (tmp_path / "set" / name.replace(" ", "_")).mkdir(parents=True)
        for i in range(3):
            shutil.copy(shapes / name / f"{i:03d}.png", tmp_path / "set" / name.replace(" ", "_"))
    (tmp_path / "t.txt").write_text("a {}\na picture of a {}\n")
    args = ["zeroshot", "--model", str(tiny_model_dir), "--data", str(tmp_path / "set")]
    assert main([*args, "--templates", str(tmp_path / "t.txt"), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["images"], out["classes"], out["templates"]) == (9, 3, 2)
    assert [row["class"] for row in out["per_class"]] == classes  # '_' in folder names -> ' '
    assert out["top5"] == 1.0  # three classes: the right one is always in the top 5

    model = coembed.load(tiny_model_dir, device="cpu")
    classifier = zeroshot_classifier(model, classes, ["a {}", "a picture of a {}"])
    images = model.embed_images([tmp_path / "set" / c.replace(" ", "_") for c in classes])
    want = zeroshot_scores(images, np.repeat(np.arange(3), 3), classifier, classes)
    assert out["top1"] == pytest.approx(want["top1"])

    assert main([*args, "--device", "cpu"]) == 0
    assert "yellow square" in capsys.readouterr().out
