"""The model directory: bitwise round trip, atomic writes, one clear error per damaged file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import coembed
from coembed.checkpoint import load_model_dir, save_model_dir
from coembed.data.transforms import Preprocess
from coembed.errors import ModelDirError
from tests.helpers import assert_one_line_error, run_cli, tiny_clip_model


def test_round_trip_is_bitwise(tiny_model_dir):
    model = tiny_clip_model()
    loaded, tokenizer, preprocess = load_model_dir(tiny_model_dir)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert preprocess == Preprocess(image_size=32)
    assert tokenizer.context_length == 16
    assert not loaded.training


def test_files_and_no_temporaries(tiny_model_dir):
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == ["config.json", "model.safetensors", "preprocess.json", "tokenizer.json"]
    assert json.loads((tiny_model_dir / "config.json").read_text())["format_version"] == 1


def test_embedder_gives_unit_float32_rows(tiny_model_dir, tmp_path):
    embedder = coembed.load(tiny_model_dir, device="cpu")
    texts = embedder.embed_texts(["a red circle", "two blue squares", ""])
    assert texts.dtype == np.float32 and texts.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
    from_folder = embedder.embed_images(folder)
    from_paths = embedder.embed_images(sorted(folder.iterdir()))
    from_pil = embedder.embed_images([Image.open(p) for p in sorted(folder.iterdir())])
    assert from_folder.shape == (3, 32) and from_folder.dtype == np.float32
    np.testing.assert_allclose(from_folder, from_paths, atol=1e-6)
    np.testing.assert_allclose(from_folder, from_pil, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(from_folder, axis=1), 1.0, atol=1e-5)


# preprocess.json as this version wrote it before it was read into a Preprocess.
OLD_PREPROCESS = {
    "image_size": 32,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "resize": "shortest_side",
    "interpolation": "bicubic",
    "crop": "center",
}


def embed_pictures(model_dir) -> np.ndarray:
    """Embeddings of three fixed non-square pictures, enough to see any preprocessing change."""
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in [(45, 37), (37, 53), (64, 64)]
    ]
    return coembed.load(model_dir, device="cpu").embed_images(pictures)


def test_old_format_directory_loads_identically(tiny_model_dir):
    path = tiny_model_dir / "preprocess.json"
    assert json.loads(path.read_text()) == OLD_PREPROCESS  # the same file as before
    fresh = embed_pictures(tiny_model_dir)
    path.write_text(json.dumps(OLD_PREPROCESS, indent=2))
    assert np.array_equal(embed_pictures(tiny_model_dir), fresh)
    path.unlink()  # a directory without preprocess.json gets CLIP's defaults
    assert load_model_dir(tiny_model_dir)[2] == Preprocess(image_size=32)
    assert np.array_equal(embed_pictures(tiny_model_dir), fresh)


@pytest.mark.parametrize(
    "change",
    [{"mean": [0.2, 0.5, 0.7]}, {"std": [0.5, 0.2, 0.4]}, {"interpolation": "bilinear"}],
)
def test_preprocess_json_is_what_the_transform_applies(tiny_model_dir, change):
    fresh = embed_pictures(tiny_model_dir)
    path = tiny_model_dir / "preprocess.json"
    path.write_text(json.dumps({**OLD_PREPROCESS, **change}))
    changed = embed_pictures(tiny_model_dir)
    # The same pictures through the same weights: only the preprocessing can move them (the
    # tiny random model is not very sensitive to its input, hence a small but certain margin).
    assert np.abs(changed - fresh).max() > 1e-5
    # The same settings handed to save_model_dir give the same file and the same embeddings.
    model, tokenizer, preprocess = load_model_dir(tiny_model_dir)
    again = save_model_dir(model, tokenizer, tiny_model_dir.parent / "again", preprocess)
    assert json.loads((again / "preprocess.json").read_text()) == {**OLD_PREPROCESS, **change}
    assert np.array_equal(embed_pictures(again), changed)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": 64}, "disagrees with config.json's model.image.image_size 32"),
        ({"crop": "random"}, "crop: 'random' is not one of center"),
        ({"interpolation": "lanczos"}, "interpolation: 'lanczos' is not one of bicubic"),
        ({"resize": "longest_side"}, "resize: 'longest_side' is not one of shortest_side"),
        ({"mean": [0.5, 0.5]}, "mean: expected three finite numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "std: every channel's must be positive"),
        ({"scale": 2}, "unknown preprocessing key 'scale'"),
    ],
)
def test_bad_preprocess_json_is_refused(tiny_model_dir, change, message):
    (tiny_model_dir / "preprocess.json").write_text(json.dumps({**OLD_PREPROCESS, **change}))
    with pytest.raises(ModelDirError, match=message):
        load_model_dir(tiny_model_dir)


def test_preprocess_json_may_leave_the_size_to_config_json(tiny_model_dir):
    values = {k: v for k, v in OLD_PREPROCESS.items() if k != "image_size"}
    (tiny_model_dir / "preprocess.json").write_text(json.dumps(values))
    assert load_model_dir(tiny_model_dir)[2].image_size == 32


def test_missing_dir_and_files(tmp_path, tiny_model_dir):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nothing")
    (tiny_model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="model.safetensors: missing"):
        load_model_dir(tiny_model_dir)


def test_truncated_weights(tiny_model_dir):
    path = tiny_model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelDirError, match="truncated or corrupt"):
        load_model_dir(tiny_model_dir)


def test_truncated_config(tiny_model_dir):
    path = tiny_model_dir / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ModelDirError, match="config.json: not valid JSON"):
        load_model_dir(tiny_model_dir)


def test_weights_of_another_model(tiny_model_dir, tmp_path, clip_tokenizer):
    other = save_model_dir(
        tiny_clip_model("model.text.layers=3"), clip_tokenizer, tmp_path / "other"
    )
    (tiny_model_dir / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ModelDirError, match="another config.json"):
        load_model_dir(tiny_model_dir)


def test_mismatched_shapes_name_the_tensor(tiny_model_dir):
    from safetensors.torch import load_file, save_file

    path = tiny_model_dir / "model.safetensors"
    state = load_file(str(path))
    state["text.proj.weight"] = torch.zeros(5, 5)
    save_file(state, str(path))
    with pytest.raises(ModelDirError, match="text.proj.weight has shape"):
        load_model_dir(tiny_model_dir)


def test_future_format_version(tiny_model_dir):
    path = tiny_model_dir / "config.json"
    values = json.loads(path.read_text())
    values["format_version"] = 99
    path.write_text(json.dumps(values))
    with pytest.raises(ModelDirError, match="format version 99"):
        load_model_dir(tiny_model_dir)


def test_cli_reports_a_bad_model_dir_in_one_line(tmp_path):
    (tmp_path / "data.csv").write_text("filepath,caption\nx.png,a cat\n")
    proc = run_cli(
        "eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "data.csv")
    )
    assert_one_line_error(proc, code=1, contains="missing")


def test_optimizer_state_round_trip_keeps_channels_last_moments(tmp_path):
    """Moments saved (contiguous) and restored take their channels_last parameter's layout back,
    so the next fused AdamW step is the one an uninterrupted optimizer takes, bit for bit."""
    from safetensors.torch import load_file, save_file

    from coembed.model import CoEmbed
    from coembed.training.optim import make_optimizer, optimizer_tensors, restore_optimizer
    from tests.helpers import tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    models = [CoEmbed(cfg.model).to(memory_format=torch.channels_last) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, cfg) for m in models]

    def step(i: int) -> None:
        for m, opt in zip(models, opts):
            gen = torch.Generator().manual_seed(i)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen).contiguous(
                    memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format
                )
            opt.step()

    step(0)
    tensors, meta = optimizer_tensors(opts[1])
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "opt.safetensors")
    opts[1] = make_optimizer(models[1], cfg)
    restore_optimizer(opts[1], load_file(tmp_path / "opt.safetensors"), meta)
    conv = next(p for p in models[1].parameters() if p.ndim == 4)
    assert opts[1].state[conv]["exp_avg"].stride() == conv.stride()
    step(1)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
