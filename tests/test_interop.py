"""open_clip / OpenAI CLIP ResNet checkpoints: parity of imported and exported models, safe loading, errors.

Every open_clip model here is built in memory with random weights (nothing is downloaded). BatchNorm
running statistics and scales are randomized too: open_clip initializes them to identity-like
values, under which a wrong BatchNorm mapping would go unnoticed.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.factory import get_model_config
from open_clip.model import CLIP
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import coembed
from coembed.checkpoint import load_model_dir, save_model_dir
from coembed.config import load_config
from coembed.errors import CoembedError, ModelDirError
from coembed.interop.openclip import (
    coembed_name,
    compatibility_problems,
    export_openclip,
    import_openclip,
    openclip_builtin_name,
    openclip_model_config,
    openclip_name,
    read_checkpoint,
    read_openclip_state,
)
from coembed.model import CoEmbed
from coembed.tokenizer import Tokenizer
from tests.helpers import SMALL, randomize, small_openclip

TOL = 1e-5

CAPTIONS = [
    "a dog on a beach",
    "A RED car parked next to a tree, at night!",
    "",
    "café crème & croissants — 2 for $5 :)",
    "Ein Hund läuft über die Straße",
    "东京的夜景",
    "the quick brown fox jumps over the lazy dog " * 12,  # longer than 77 tokens: truncated
    "numbers 1234567 and emoji 🐶🚗",
    "don't we're it's <b>bold</b> &amp; done",
]


def test_images(size: int) -> list[Image.Image]:
    """Real-looking pictures: gradients, shapes, noise, text; several sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(size, size), (173, 97), (80, 211), (400, 300)]):
        x = np.linspace(0, 1, w)[None, :, None]
        y = np.linspace(0, 1, h)[:, None, None]
        base = np.concatenate([x * np.ones((h, 1, 1)), y * np.ones((1, w, 1)), (x + y) / 2], axis=2)
        base = base + rng.normal(0, 0.08, base.shape)
        image = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw.ellipse((w // 5, h // 4, w // 2, h // 2 + 10), fill=(200, 30 * i, 40))
        draw.rectangle((w // 2, h // 3, w - 5, h - 5), outline=(0, 0, 255), width=3)
        draw.text((3, 3), f"img {i}", fill=(255, 255, 255))
        images.append(image)
    return images


# Not a test itself: pytest would otherwise collect the helper above by its name.
test_images.__test__ = False


def openclip_embeddings(model: CLIP, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, image embeddings, text embeddings) from open_clip's own preprocessing and tokenizer."""
    preprocess = open_clip.image_transform(size, is_train=False)
    pixels = torch.stack([preprocess(im) for im in test_images(size)])
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(open_clip.tokenize(CAPTIONS), normalize=True)
    return pixels, image, text


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def test_tokens_match_open_clip():
    assert torch.equal(Tokenizer.clip()(CAPTIONS), open_clip.tokenize(CAPTIONS))


def test_names_round_trip():
    model, _ = small_openclip("quickgelu")
    cfg = load_config("rn50", small_openclip("quickgelu")[1]).model
    coembed_keys = set(CoEmbed(cfg).state_dict())
    for name in model.state_dict():
        if name == "attn_mask":
            continue
        assert coembed_name(name) in coembed_keys, name
        assert openclip_name(coembed_name(name)) == name
    assert coembed_name("visual.attnpool.c_proj.weight") == "visual.pool.c_proj.weight"
    assert coembed_name("transformer.resblocks.3.attn.in_proj_weight") == (
        "text.blocks.3.attn.qkv.weight"
    )
    assert coembed_name("visual.layer2.0.downsample.1.running_var") == (
        "visual.trunk.layer2.0.downsample.1.running_var"
    )


@pytest.mark.parametrize("name", sorted(SMALL))
def test_import_matches_open_clip(name, tmp_path):
    model, overrides = small_openclip(name, seed=len(name))
    size = SMALL[name][3]
    pixels, ref_image, ref_text = openclip_embeddings(model, size)
    # Each variant saves its file in another of the forms open_clip writes.
    state = model.state_dict()
    if name == "gelu":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif name == "deeper":
        path = tmp_path / "epoch_3.pt"  # open_clip training checkpoint from DDP
        wrapped = {"module." + k: v for k, v in state.items()}
        torch.save({"epoch": 3, "name": "run", "state_dict": wrapped}, path)
    else:
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, path)

    out = import_openclip(str(path), "rn50", str(tmp_path / "converted"), overrides)
    ce, tokenizer, _ = load_model_dir(out)
    tokens = tokenizer(CAPTIONS)
    assert torch.equal(tokens, open_clip.tokenize(CAPTIONS))
    with torch.no_grad():
        image = ce.encode_image(pixels)
        text = ce.encode_text(tokens)
    print(f"{name}: image {max_diff(image, ref_image):.2e} text {max_diff(text, ref_text):.2e}")
    assert max_diff(image, ref_image) < TOL
    assert max_diff(text, ref_text) < TOL
    assert max_diff(ce.logit_scale, model.logit_scale) == 0

    # The public API end to end: its own image decoding/transform and tokenizer.
    embedder = coembed.load(out, device="cpu")
    assert max_diff(embedder.embed_images(test_images(size)), ref_image) < TOL
    assert max_diff(embedder.embed_texts(CAPTIONS), ref_text) < TOL


def test_torchscript_archive_is_read_without_running_it(tmp_path):
    """OpenAI publishes RN checkpoints as traced TorchScript archives; read their tensors only."""
    model, overrides = small_openclip("quickgelu", seed=3)
    # The archive holds the whole module tree and all its tensors whichever methods are traced;
    # tracing one cheap method without re-checking keeps the test fast.
    example = (open_clip.tokenize(["a photo"]),)
    traced = torch.jit.trace_module(model, {"encode_text": example}, check_trace=False)
    path = tmp_path / "RN-tiny.pt"
    torch.jit.save(traced, str(path))
    state = read_checkpoint(path)
    expected = model.state_dict()
    assert set(state) == {*expected, "attn_mask"}  # the mask is read, then skipped as a non-weight
    assert all(torch.equal(state[k], v) for k, v in expected.items())

    out = import_openclip(str(path), "rn50", str(tmp_path / "converted"), overrides)
    pixels, ref_image, ref_text = openclip_embeddings(model, SMALL["quickgelu"][3])
    ce, tokenizer, _ = load_model_dir(out)
    with torch.no_grad():
        assert max_diff(ce.encode_image(pixels), ref_image) < TOL
        assert max_diff(ce.encode_text(tokenizer(CAPTIONS)), ref_text) < TOL


def test_openai_float16_state_dict(tmp_path):
    """OpenAI's non-TorchScript form: half-precision weights, hyper-parameters as tensors, no BN counters."""
    model, overrides = small_openclip("gelu", seed=5)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") or k == "attn_mask":
            continue
        state[k] = v.half() if v.is_floating_point() else v
    state.update(
        input_resolution=torch.tensor(96),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    path = tmp_path / "RN.pt"
    torch.save(state, path)
    # The reference is open_clip holding the same half-rounded weights in float32.
    model.load_state_dict(
        {k: v.float() for k, v in state.items() if k in model.state_dict()}, strict=False
    )
    cfg = load_config("rn50", overrides).model
    ce = CoEmbed(cfg)
    ce.load_state_dict(read_openclip_state(str(path), cfg), strict=True)
    ce.eval()
    pixels, ref_image, ref_text = openclip_embeddings(model, SMALL["gelu"][3])
    with torch.no_grad():
        assert max_diff(ce.encode_image(pixels), ref_image) < TOL
        assert max_diff(ce.encode_text(open_clip.tokenize(CAPTIONS)), ref_text) < TOL
    assert all(v.dtype != torch.float16 for v in ce.state_dict().values())


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    # A plain torch.save file: weights_only refuses the global.
    plain = tmp_path / "plain.pt"
    torch.save({"token_embedding.weight": torch.zeros(2), "x": _Exploit(marker)}, plain)
    # A TorchScript-looking archive whose data.pkl calls os.system.
    archive = tmp_path / "jit.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps(_Exploit(marker), protocol=2))
        z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
    for path in (plain, archive):
        with pytest.raises(ModelDirError, match="holds Python objects besides tensors"):
            read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["quickgelu", "gelu"])
def test_export_loads_in_open_clip(name, tmp_path):
    _, overrides = small_openclip(name)
    cfg = load_config("rn50", overrides).model
    torch.manual_seed(11)
    ce = CoEmbed(cfg)
    randomize(ce)
    model_dir = save_model_dir(ce.eval(), Tokenizer.clip(), tmp_path / "model")
    suffix = ".safetensors" if name == "gelu" else ".pt"
    weights = export_openclip(str(model_dir), str(tmp_path / f"coembed-{name}{suffix}"))

    open_clip.add_model_config(weights.with_suffix(".json"))
    oc = open_clip.create_model(f"coembed-{name}", pretrained=str(weights)).eval()
    size = cfg.image.image_size
    pixels, ref_image, ref_text = openclip_embeddings(oc, size)
    with torch.no_grad():
        image = ce.encode_image(pixels)
        text = ce.encode_text(Tokenizer.clip()(CAPTIONS))
    print(
        f"export {name}: image {max_diff(image, ref_image):.2e} text {max_diff(text, ref_text):.2e}"
    )
    assert max_diff(image, ref_image) < TOL
    assert max_diff(text, ref_text) < TOL
    assert max_diff(oc.logit_scale, ce.logit_scale) == 0


@pytest.mark.parametrize(
    "override, reason",
    [
        ("model.text.positional=sinusoidal", "learned positions"),
        ("model.text.pool=mean", "pools the end-of-text token"),
        ("model.text.attention=bidirectional", "causal"),
        ("model.image.backbone=resnet18", "torchvision backbone"),
        ("model.image.pool=avg", "attention pooling"),
        ("model.text.eot_id=3", "largest token id"),
    ],
)
def test_incompatible_configs_say_why(override, reason):
    cfg = load_config("rn50", [override]).model
    problems = compatibility_problems(cfg)
    assert len(problems) == 1 and reason in problems[0]


def test_export_refuses_incompatible_models(tmp_path):
    small = ["model.image.layers=[1,1,1,1]", "model.image.width=8", "model.image.image_size=64"]
    small += [
        "model.image.heads=4",
        "model.text.width=16",
        "model.text.heads=2",
        "model.text.layers=1",
    ]
    sinus = load_config("rn50", [*small, "model.text.positional=sinusoidal"]).model
    save_model_dir(CoEmbed(sinus), Tokenizer.clip(), tmp_path / "sinus")
    with pytest.raises(
        CoembedError, match="cannot export to open_clip: text positions are 'sinusoidal'"
    ):
        export_openclip(str(tmp_path / "sinus"), str(tmp_path / "out.pt"))

    trained = Tokenizer.train([f"caption number {i} of a cat" for i in range(50)], vocab_size=600)
    cfg = load_config(
        "rn50",
        [
            *small,
            "model.tokenizer=trained",
            f"model.text.vocab_size={trained.vocab_size}",
            f"model.text.eot_id={trained.eot_id}",
        ],
    ).model
    save_model_dir(CoEmbed(cfg), trained, tmp_path / "trained")
    with pytest.raises(CoembedError, match="open_clip models use CLIP's BPE tokenizer"):
        export_openclip(str(tmp_path / "trained"), str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    "recipe, name",
    [("rn50", "RN50-quickgelu"), ("rn101", "RN101-quickgelu"), ("rn50x4", "RN50x4-quickgelu")],
)
def test_shipped_recipes_have_openai_shapes(recipe, name):
    """Every tensor of open_clip's built-in model has a same-shaped place in the recipe (checked on meta)."""
    cfg = load_config(recipe).model
    assert openclip_builtin_name(cfg) == name
    oc_cfg = get_model_config(name)
    ours = openclip_model_config(cfg)
    assert ours["vision_cfg"]["layers"] == list(oc_cfg["vision_cfg"]["layers"])
    with torch.device("meta"):
        oc = CLIP(**oc_cfg)
        ce = CoEmbed(cfg)
    ce_shapes = {k: tuple(v.shape) for k, v in ce.state_dict().items()}
    for k, v in oc.state_dict().items():
        if k == "attn_mask":
            continue
        shape = tuple(v.shape)[::-1] if k == "text_projection" else tuple(v.shape)
        assert ce_shapes.pop(coembed_name(k)) == shape, k
    assert not ce_shapes


@pytest.mark.slow
def test_rn50_import_and_export_parity(tmp_path):
    """The real RN50 shapes, both ways, with open_clip's built-in model name."""
    torch.manual_seed(0)
    oc = open_clip.create_model("RN50-quickgelu")
    randomize(oc)
    oc.eval()
    path = tmp_path / "rn50.pt"
    torch.save(oc.state_dict(), path)
    out = import_openclip(str(path), "rn50", str(tmp_path / "rn50"))
    path.unlink()
    ce, tokenizer, _ = load_model_dir(out)
    pixels, ref_image, ref_text = openclip_embeddings(oc, 224)
    with torch.no_grad():
        image, text = ce.encode_image(pixels), ce.encode_text(tokenizer(CAPTIONS))
    print(
        f"RN50 import: image {max_diff(image, ref_image):.2e} text {max_diff(text, ref_text):.2e}"
    )
    assert max_diff(image, ref_image) < TOL
    assert max_diff(text, ref_text) < TOL
    del oc

    weights = export_openclip(str(out), str(tmp_path / "exported.pt"))
    back = open_clip.create_model("RN50-quickgelu", pretrained=str(weights)).eval()
    with torch.no_grad():
        image2 = back.encode_image(pixels, normalize=True)
        text2 = back.encode_text(open_clip.tokenize(CAPTIONS), normalize=True)
    assert max_diff(image2, ref_image) < TOL
    assert max_diff(text2, ref_text) < TOL


# ---------------------------------------------------------------------------------------------
# The command line and bad files


CLI = [str(Path(sys.executable).parent / "coembed"), "convert"]


def test_cli_convert_round_trip(tmp_path):
    model, overrides = small_openclip("quickgelu")
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    sets = [arg for o in overrides for arg in ("--set", o)]
    args = [
        "--from-openclip",
        str(good),
        "--config",
        "rn50",
        *sets,
        "--output",
        str(tmp_path / "m"),
    ]
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    args = ["--to-openclip", str(tmp_path / "m"), "--output", str(tmp_path / "back.pt")]
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    original = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
    assert set(back) == set(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_cli_convert_errors(tmp_path):
    """Each bad input: exit code 1, one line on stderr that says what is wrong, no traceback."""
    model, overrides = small_openclip("quickgelu")
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    sets = [arg for o in overrides for arg in ("--set", o)]
    vit = tmp_path / "vit.pt"
    vit_state = {"visual.class_embedding": torch.zeros(8), "visual.proj": torch.zeros(8, 4)}
    torch.save({**vit_state, "visual.conv1.weight": torch.zeros(8, 3, 16, 16)}, vit)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    notes = tmp_path / "notes.pt"
    notes.write_text("just some text, not a checkpoint\n")

    cases = [
        (vit, sets, "ViT checkpoints are not supported yet: coembed imports the ResNet family"),
        (
            good,
            [],  # the rn50 recipe as it is: far wider than this checkpoint
            "tensor positional_embedding has shape (77, 32) in the checkpoint, the config expects (77, 512)",
        ),
        (truncated, sets, "truncated or corrupt"),
        (notes, sets, "not a PyTorch checkpoint"),
    ]
    # Started together: each run is mostly the interpreter importing torch.
    runs = [
        subprocess.Popen(
            [
                *CLI,
                "--from-openclip",
                str(path),
                "--config",
                "rn50",
                *extra,
                "--output",
                str(tmp_path / "x"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path, extra, _ in cases
    ]
    for run, (_, _, expected) in zip(runs, cases):
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 1, stderr
        assert "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert expected in lines[0], lines[0]
    assert not (tmp_path / "x").exists()


def test_bad_files_in_process(tmp_path):
    """The cases the CLI test leaves out (each run there costs a Python start-up with torch)."""
    model, overrides = small_openclip("quickgelu")
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    fewer_layers = load_config("rn50", [*overrides, "model.text.layers=1"]).model
    with pytest.raises(ModelDirError, match=r"left unused \(first: transformer\.resblocks\.1\."):
        read_openclip_state(str(good), fewer_layers)
    more_layers = load_config("rn50", [*overrides, "model.image.layers=[1,1,2,1]"]).model
    with pytest.raises(ModelDirError, match=r"not in the checkpoint \(first: visual\.layer3\.1\."):
        read_openclip_state(str(good), more_layers)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelDirError, match="truncated or corrupt"):
        read_checkpoint(corrupt)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    coembed_weights = tmp_path / "model.safetensors"
    save_file(
        {
            "text.blocks.0.attn.qkv.weight": torch.zeros(3, 1),
            "visual.trunk.conv1.weight": torch.zeros(1),
        },
        coembed_weights,
    )
    with pytest.raises(ModelDirError, match="not a checkpoint \\(it holds no named tensors\\)"):
        read_checkpoint(listing)
    with pytest.raises(ModelDirError, match="empty file"):
        read_checkpoint(empty)
    with pytest.raises(ModelDirError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "missing.pt")
    cfg = load_config("rn50").model
    with pytest.raises(ModelDirError, match="this is a coembed checkpoint"):
        read_openclip_state(str(coembed_weights), cfg)


def test_init_state(tmp_path):
    """``train --init FILE``: a state dict that loads strictly, logit bias from config or file."""
    model, overrides = small_openclip("deeper")
    path = tmp_path / "init.pt"
    torch.save(model.state_dict(), path)
    # A SigLIP run initialized from a CLIP checkpoint: the bias starts at the config's value.
    siglip = load_config("rn50", [*overrides, "train.loss=siglip"]).model
    state = read_openclip_state(str(path), siglip)
    CoEmbed(siglip).load_state_dict(state, strict=True)
    assert float(state["logit_bias"]) == -10.0
    torch.save({**model.state_dict(), "logit_bias": torch.tensor([-3.0])}, path)
    assert float(read_openclip_state(str(path), siglip)["logit_bias"]) == -3.0
    with pytest.raises(ModelDirError, match="the checkpoint has a logit_bias"):
        read_openclip_state(str(path), load_config("rn50", overrides).model)
