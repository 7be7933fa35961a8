"""ONNX export of both towers: onnxruntime matches torch, any batch size, files written atomically."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from coembed.checkpoint import save_model_dir
from coembed.config import load_config
from coembed.errors import CoembedError, ModelDirError
from coembed.interop import onnx as coembed_onnx
from coembed.interop.onnx import export_onnx
from coembed.model import CoEmbed
from coembed.tokenizer import Tokenizer

CAPTIONS = ["a red circle", "", "two blue squares next to a small green triangle " * 3, "a cat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with non-trivial BatchNorm statistics, saved as a model directory."""
    tokenizer = Tokenizer.train(
        [
            f"a {c} {s} number {i}"
            for i in range(40)
            for c in ("red", "blue")
            for s in ("cat", "car")
        ],
        vocab_size=560,
        context_length=16,
    )
    overrides = [
        "model.embed_dim=24",
        "model.image.layers=[1,1,1,1]",
        "model.image.width=16",
        "model.image.image_size=64",
        "model.image.heads=8",
        "model.text.width=32",
        "model.text.heads=4",
        "model.text.layers=2",
        "model.text.context_length=16",
        f"model.text.vocab_size={tokenizer.vocab_size}",
        f"model.text.eot_id={tokenizer.eot_id}",
    ]
    torch.manual_seed(0)
    model = CoEmbed(load_config("tiny", overrides).model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen) * 0.3 + 1)
    return save_model_dir(model.eval(), tokenizer, tmp_path_factory.mktemp("onnx") / "model"), model


def test_onnx_matches_torch_at_any_batch(model_dir, tmp_path):
    directory, model = model_dir
    paths = export_onnx(str(directory), str(tmp_path / "out"))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(p.name for p in paths)  # nothing else, no temporary files left
    spec = json.loads((tmp_path / "out" / "onnx.json").read_text())
    exported = (tmp_path / "out" / "preprocess.json").read_text()
    assert exported == (directory / "preprocess.json").read_text()

    image = ort.InferenceSession(str(paths[0]), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(paths[1]), providers=["CPUExecutionProvider"])
    assert image.get_inputs()[0].name == spec["image"]["input"]["name"] == "pixel_values"
    assert text.get_inputs()[0].name == spec["text"]["input"]["name"] == "tokens"
    tokenizer = Tokenizer.load(tmp_path / "out" / "tokenizer.json")

    gen = torch.Generator().manual_seed(2)
    for batch in (1, 3, 7):  # the example batch was 2: these prove the batch axis is dynamic
        pixels = torch.randn(batch, 3, 64, 64, generator=gen)
        tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
        with torch.no_grad():
            ref_image = model.encode_image(pixels).numpy()
            ref_text = model.encode_text(tokens).numpy()
        (got_image,) = image.run(None, {"pixel_values": pixels.numpy()})
        (got_text,) = text.run(None, {"tokens": tokens.numpy()})
        assert got_image.shape == (batch, 24) and got_text.shape == (batch, 24)
        print(
            f"batch {batch}: image {np.abs(got_image - ref_image).max():.2e} "
            f"text {np.abs(got_text - ref_text).max():.2e}"
        )
        np.testing.assert_allclose(got_image, ref_image, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_text, ref_text, atol=1e-4, rtol=0)


def test_failed_export_leaves_old_files_whole(model_dir, tmp_path, monkeypatch):
    directory, _ = model_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "image_encoder.onnx").write_bytes(b"previous export")

    class HalfWritten:
        def save(self, path, **_):
            with open(path, "wb") as f:
                f.write(b"half of a graph")
            raise OSError("No space left on device")

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: HalfWritten())
    with pytest.raises(CoembedError, match="No space left"):
        export_onnx(str(directory), str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no stage left
    assert (out / "image_encoder.onnx").read_bytes() == b"previous export"


def test_bad_inputs(tmp_path, model_dir, monkeypatch):
    with pytest.raises(ModelDirError, match="not a model directory"):
        export_onnx(str(tmp_path / "nothing"), str(tmp_path / "out"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CoembedError, match="is not a directory"):
        export_onnx(str(model_dir[0]), str(tmp_path / "file"))

    def missing(*_):
        raise ImportError("No module named 'onnxscript'", name="onnxscript")

    monkeypatch.setattr(coembed_onnx, "_import_exporter", missing)
    with pytest.raises(CoembedError, match="needs the onnx and onnxscript packages"):
        export_onnx(str(model_dir[0]), str(tmp_path / "out"))
