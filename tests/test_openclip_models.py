"""open_clip's own model names in ``coembed convert --from-openclip``, the shapes read from the
checkpoint when neither a name nor a recipe is given, and the text activation each conversion
states.

GELU and QuickGELU checkpoints have the same tensors: only the name the model was trained under
says which activation its text tower needs. Every open_clip model here is built in memory with
random weights (nothing is downloaded); BatchNorm statistics are randomized too.
"""

from __future__ import annotations

import re

import open_clip
import pytest
import torch
from open_clip.factory import get_model_config
from open_clip.model import CLIP

import coembed
from coembed.config import load_config
from coembed.interop.openclip import (
    OPENCLIP_MODELS,
    coembed_name,
    openclip_builtin_name,
    openclip_model_config,
    openclip_model_overrides,
)
from coembed.model import CoEmbed
from tests.helpers import (
    HEADS_64,
    assert_one_line_error,
    heads_64_openclip,
    ok,
    randomize,
    run_cli_batch,
)

# The parity tolerance of tests/test_interop.py: float32 round-off between two implementations.
TOL = 1e-5
# A text tower run with the other activation is off by ~1e-3 (max abs, unit embeddings).
WRONG_ACTIVATION = 1e-4

CAPTIONS = ["a dog on a beach", "A RED car parked next to a tree, at night!", "two blue squares"]


def open_clip_resnets() -> list[str]:
    """The CLIP ResNet names the installed open_clip knows."""
    return sorted(n for n in open_clip.list_models() if re.fullmatch(r"RN\d+(x\d+)?(-.+)?", n))


def test_the_names_are_open_clips():
    assert sorted(OPENCLIP_MODELS) == open_clip_resnets()


@pytest.mark.parametrize("name", OPENCLIP_MODELS)
def test_each_name_has_open_clips_shapes_and_activation(name):
    cfg = load_config("rn50", openclip_model_overrides(name)).model
    theirs, ours = get_model_config(name), openclip_model_config(cfg)
    assert ours["quick_gelu"] == theirs.get("quick_gelu", False)
    assert cfg.text.act == ("quick_gelu" if name.endswith("-quickgelu") else "gelu")
    assert ours["embed_dim"] == theirs["embed_dim"]
    for key in ("layers", "width", "image_size"):
        assert ours["vision_cfg"][key] == list_or_value(theirs["vision_cfg"][key]), key
    assert ours["vision_cfg"]["head_width"] == theirs["vision_cfg"].get("head_width", 64)
    for key in ("context_length", "vocab_size", "width", "heads", "layers"):
        assert ours["text_cfg"][key] == theirs["text_cfg"][key], key
    assert openclip_builtin_name(cfg) == name
    with torch.device("meta"):
        ce = CoEmbed(cfg).state_dict()
        oc = CLIP(**theirs).state_dict()
    for key, tensor in oc.items():
        if key != "attn_mask":
            shape = tuple(tensor.shape)[::-1] if key == "text_projection" else tuple(tensor.shape)
            assert tuple(ce[coembed_name(key)].shape) == shape, key


def list_or_value(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# --- small models through the command line --------------------------------------------------------


def pictures(size: int) -> torch.Tensor:
    """(4, 3, size, size) normalized pixels: smooth random images."""
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(4, 3, 8, 8, generator=gen) * 4 - 2
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")


@torch.no_grad()
def embeddings(model, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) unit embeddings of an open_clip model or a coembed Embedder's model."""
    tokens = open_clip.tokenize(CAPTIONS)
    if isinstance(model, CLIP):
        return (
            model.encode_image(pictures(size), normalize=True),
            model.encode_text(tokens, normalize=True),
        )
    return model.encode_image(pictures(size)), model.encode_text(tokens)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def converted(folder):
    """The model of a converted model directory, in eval mode."""
    return coembed.load(folder, device="cpu").model


def convert(file, output, *extra: str) -> list[str]:
    return ["convert", "--from-openclip", str(file), "--output", str(output), *extra]


def test_convert_reads_shapes_and_states_the_activation(tmp_path):
    gelu, quick = heads_64_openclip(False, seed=1), heads_64_openclip(True, seed=2)
    plain = tmp_path / "open_clip_gelu.pt"
    torch.save(gelu.state_dict(), plain)
    # OpenAI's own files carry their hyper-parameters as tensors beside the weights.
    openai = tmp_path / "openai.pt"
    hyper = {"input_resolution": torch.tensor(64), "context_length": torch.tensor(77)}
    torch.save({**quick.state_dict(), **hyper, "vocab_size": torch.tensor(49408)}, openai)
    small = [arg for pair in HEADS_64 for arg in ("--set", pair)]
    unsure, chosen, from_openai, recipe, typo, both = run_cli_batch(
        [
            convert(plain, tmp_path / "unsure"),
            convert(plain, tmp_path / "chosen", "--set", "model.text.act=gelu"),
            convert(openai, tmp_path / "openai"),
            convert(plain, tmp_path / "recipe", "--config", "rn50", *small),
            convert(plain, tmp_path / "typo", "--openclip-model", "RN5O"),
            convert(plain, tmp_path / "both", "--openclip-model", "RN50", "--config", "rn50"),
        ]
    )
    assert_one_line_error(unsure, 2, "do not say whether the text tower uses GELU or QuickGELU")
    assert "--set model.text.act=gelu or quick_gelu" in unsure.stderr
    assert_one_line_error(typo, 2, "RN50-quickgelu")
    assert_one_line_error(both, 2, "not both")
    for name in ("unsure", "typo", "both"):
        assert not (tmp_path / name).exists()

    assert "shapes from the checkpoint's tensors" in ok(chosen).stdout
    assert "text activation GELU (from --set model.text.act)" in chosen.stdout
    assert "text activation QuickGELU (from an OpenAI CLIP file" in ok(from_openai).stdout
    assert "text activation QuickGELU (from --config rn50)" in ok(recipe).stdout
    for folder, reference in (("chosen", gelu), ("openai", quick)):
        image, text = embeddings(converted(tmp_path / folder), 64)
        ref_image, ref_text = embeddings(reference, 64)
        print(
            f"{folder}: image {max_diff(image, ref_image):.1e} text {max_diff(text, ref_text):.1e}"
        )
        assert max_diff(image, ref_image) < TOL
        assert max_diff(text, ref_text) < TOL
    # The recipe's QuickGELU on a GELU checkpoint: the silent error this guards against.
    _, text = embeddings(converted(tmp_path / "recipe"), 64)
    assert max_diff(text, embeddings(gelu, 64)[1]) > WRONG_ACTIVATION


@pytest.mark.slow
def test_rn50_gelu_and_quickgelu_by_name(tmp_path):
    """open_clip's RN50 (GELU) and RN50-quickgelu, real shapes, one set of random weights."""
    torch.manual_seed(0)
    model = open_clip.create_model("RN50")
    randomize(model)
    state = model.eval().state_dict()
    references = {"RN50": embeddings(model, 224)}
    del model
    quick = open_clip.create_model("RN50-quickgelu")
    quick.load_state_dict(state)
    references["RN50-quickgelu"] = embeddings(quick.eval(), 224)
    del quick
    path = tmp_path / "rn50.pt"
    torch.save(state, path)
    del state
    *procs, unsure = run_cli_batch(
        [convert(path, tmp_path / name, "--openclip-model", name) for name in references]
        + [convert(path, tmp_path / "unsure")]
    )
    path.unlink()
    assert_one_line_error(unsure, 2, "--openclip-model RN50 for GELU, RN50-quickgelu for QuickGELU")
    stated = {"RN50": "GELU", "RN50-quickgelu": "QuickGELU"}
    for proc, name in zip(procs, references):
        assert f"open_clip's {name} " in ok(proc).stdout
        assert f"text activation {stated[name]} (from {name})" in proc.stdout
    for name, (ref_image, ref_text) in references.items():
        image, text = embeddings(converted(tmp_path / name), 224)
        print(f"{name}: image {max_diff(image, ref_image):.1e} text {max_diff(text, ref_text):.1e}")
        assert max_diff(image, ref_image) < TOL
        assert max_diff(text, ref_text) < TOL
    # Converted as the other one, the text is off by far more than round-off.
    wrong = max_diff(
        embeddings(converted(tmp_path / "RN50-quickgelu"), 224)[1], references["RN50"][1]
    )
    print(f"RN50 converted as RN50-quickgelu: text {wrong:.1e}")
    assert wrong > WRONG_ACTIVATION
