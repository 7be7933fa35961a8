"""Config recipes, overrides and validation."""

from __future__ import annotations

import copy

import pytest

from coembed.config import Config, complete_config, load_config, parse_overrides, validate
from coembed.errors import ConfigError


def test_overrides_apply_with_types():
    cfg = load_config(
        "tiny",
        [
            "train.lr=3e-4",
            "model.text.layers=2",
            "data.augment=false",
            "model.image.layers=[2,2,2,2]",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.model.text.layers == 2
    assert cfg.data.augment is False and cfg.model.image.layers == [2, 2, 2, 2]


def test_nested_override_dict():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("model.text.pool=first", "model.text.pool: 'first' is not one of eot, cls, mean, max"),
        ("model.text.layers=two", "model.text.layers: expected an integer"),
        ("model.text.layers=1.5", "model.text.layers: expected an integer"),
        ("train.lr=nan", "train.lr: expected a finite number"),
        ("train.batch_size=0", "train.batch_size: must be positive"),
        ("model.text.heads=3", "divisible by model.text.heads"),
        ("model.image.image_size=100", "multiple of 32"),
        ("model.text.pool=cls", "needs model.text.attention=bidirectional"),
        ("data.augment=maybe", "data.augment: expected true or false"),
        ("nonsense", "--set expects key=value"),
        ("train=3", "train: expected a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("nope")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
    path.write_text("model:\n  text:\n    widthh: 3\n")
    with pytest.raises(ConfigError, match="model.text.widthh"):
        load_config(str(path))


@pytest.mark.parametrize("recipe", ["tiny", "rn50"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_validate_changes_nothing(recipe, loss):
    cfg = load_config(recipe, [f"train.loss={loss}"])
    cfg.model.init_logit_bias = None  # what completion would fill in for the sigmoid loss
    before = copy.deepcopy(cfg)
    assert validate(cfg) is cfg
    assert cfg == before


def test_completion_is_its_own_step_and_returns_a_copy():
    cfg = Config()
    cfg.train.loss = "siglip"
    before = copy.deepcopy(cfg)
    done = complete_config(cfg)
    assert cfg == before and done is not cfg
    assert done.model.init_logit_bias == -10.0  # the sigmoid loss's starting bias
    assert load_config("tiny", ["train.loss=siglip"]).model.init_logit_bias == -10.0
    given = load_config("tiny", ["train.loss=siglip", "model.init_logit_bias=-3"])
    assert given.model.init_logit_bias == -3.0  # a bias given is kept
    assert load_config("tiny").model.init_logit_bias is None  # the softmax loss has none


def test_clip_tokenizer_on_a_trained_tokenizer_recipe_says_what_to_set():
    # tiny.yaml sizes a trained BPE (4000 tokens); switching to CLIP's needs CLIP's vocabulary.
    with pytest.raises(ConfigError, match=r"set model\.text\.vocab_size=49408"):
        load_config("tiny", ["model.tokenizer=clip"])
    cfg = load_config("tiny", ["model.tokenizer=clip", "model.text.vocab_size=49408"])
    assert (cfg.model.text.vocab_size, cfg.model.text.eot_id) == (49408, 49407)
