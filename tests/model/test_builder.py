"""Building models from recipes: the real `from_pretrained` path, exercised on tiny checkpoints saved locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, CLIPConfig, CLIPModel, CLIPVisionModel, PreTrainedTokenizerFast

from moe_llava.constants import IMAGE_TOKEN
from moe_llava.model import MoELlavaForCausalLM
from moe_llava.model.builder import build_image_processor, build_model
from tests.conftest import tiny_llama_config, tiny_phi_config, tiny_vision_config, tiny_vision_values

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    torch.manual_seed(0)
    paths = {"vision": tmp_path / "vision", "clip_full": tmp_path / "clip", "lm": tmp_path / "lm"}
    CLIPVisionModel(tiny_vision_config()).save_pretrained(paths["vision"])
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(vision_config=tiny_vision_config().to_dict(), text_config=text)).save_pretrained(
        paths["clip_full"]
    )
    AutoModelForCausalLM.from_config(tiny_phi_config()).save_pretrained(paths["lm"])
    return paths


def test_pretrained_towers_load_their_weights(checkpoints):
    model = build_model(
        vision_tower={"name_or_path": str(checkpoints["vision"])},
        language_model={"name_or_path": str(checkpoints["lm"])},
        pretrained=True,
    )
    saved_vision = CLIPVisionModel.from_pretrained(checkpoints["vision"])
    saved_lm = AutoModelForCausalLM.from_pretrained(checkpoints["lm"])
    for key, value in saved_vision.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[key], value), key
    for key, value in saved_lm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key
    assert model.config.text_config.model_type == "phi"
    assert model.config.image_token_id == model.get_input_embeddings().num_embeddings - 1


def test_vision_half_of_a_full_clip_checkpoint(checkpoints):
    model = build_model(
        vision_tower={"name_or_path": str(checkpoints["clip_full"])},
        language_model={"name_or_path": str(checkpoints["lm"])},
    )
    full = CLIPModel.from_pretrained(checkpoints["clip_full"])
    for key, value in full.vision_model.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[key], value), key


def test_tokenizer_adds_image_token_and_resizes_pretrained_embeddings(checkpoints):
    tokenizer = word_tokenizer([f"w{i}" for i in range(200)])  # larger than the tiny LM's 96-token vocabulary
    assert IMAGE_TOKEN not in tokenizer.get_vocab()
    model = build_model(
        vision_tower={"name_or_path": str(checkpoints["vision"])},
        language_model={"name_or_path": str(checkpoints["lm"])},
        tokenizer=tokenizer,
    )
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_from_config_lm_takes_the_tokenizer_vocabulary():
    tokenizer = word_tokenizer(["red", "circle", IMAGE_TOKEN])
    model = build_model(
        vision_tower={"config": {"model_type": "clip_vision_model", **tiny_vision_config().to_diff_dict()}},
        language_model={"config": {"model_type": "llama", **tiny_llama_config().to_diff_dict()}},
        tokenizer=tokenizer,
        pretrained=False,
    )
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def test_hydra_composed_tiny_recipe_builds_and_runs():
    with initialize_config_dir(config_dir=str(CONF_DIR / "model"), version_base="1.3"):
        cfg = compose(config_name="tiny")
    model = instantiate(cfg)
    assert isinstance(model, MoELlavaForCausalLM)
    processor = build_image_processor(cfg.vision_tower, pretrained=cfg.pretrained)
    from PIL import Image

    pixels = processor(images=[Image.new("RGB", (100, 80), "red")], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    n = model.num_image_tokens
    input_ids = torch.cat([torch.full((1, n), model.config.image_token_id), torch.tensor([[5, 6, 7]])], dim=1)
    assert model(input_ids, pixels, labels=input_ids).loss.isfinite()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"vision_tower": {"config": {"hidden_size": 8}}}, "model_type"),
        ({"vision_tower": {}}, "name_or_path or config"),
        ({"vision_tower": {"config": {"model_type": "llama"}}}, "unsupported vision"),
        ({"language_model": {"config": {"model_type": "no-such-model"}}}, "no-such-model"),
    ],
)
def test_bad_recipes_name_the_key(spec, message):
    recipe = {
        "vision_tower": {
            "config": {"model_type": "clip_vision_model", **tiny_vision_config().to_diff_dict()}
        },
        "language_model": {"config": {"model_type": "llama", **tiny_llama_config().to_diff_dict()}},
        **spec,
    }
    with pytest.raises(ValueError, match=message):
        build_model(**recipe, pretrained=False)


# ---------------------------------------------------------------------------------------------------
# pretrained: true: the checkpoint's config wins; a recipe value that disagrees is an error naming it
def siglip_checkpoint(path: Path) -> Path:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**tiny_vision_values())
    SiglipVisionModel(config).save_pretrained(path)
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_a_siglip_tower_by_path_builds_siglip_whatever_the_recipe_says(checkpoints, tmp_path):
    """The class comes from the checkpoint's config: the CLIP recipe's tower given a SigLIP path is
    SigLIP (its config values dropped, as a user swapping the tower does), with SigLIP's processor."""
    from transformers import SiglipVisionModel

    from moe_llava.model.builder import build_image_processor

    path = siglip_checkpoint(tmp_path / "siglip")
    model = build_model(
        vision_tower={"name_or_path": str(path), "config": None},
        language_model={"name_or_path": str(checkpoints["lm"])},
    )
    assert isinstance(model.vision_tower, SiglipVisionModel) and model.num_image_tokens == 16
    assert type(build_image_processor({"name_or_path": str(path)})).__name__.startswith("Siglip")


@pytest.mark.parametrize(
    ("role", "values", "key"),
    [
        ("vision_tower", {"model_type": "clip_vision_model", "image_size": 336}, "model.vision_tower.config.image_size"),
        ("vision_tower", {"model_type": "clip_vision_model"}, "model.vision_tower.config.model_type"),  # a SigLIP path
        ("language_model", {"model_type": "phi", "num_hidden_layers": 32}, "model.language_model.config.num_hidden_layers"),
        ("language_model", {"model_type": "phi", "max_position_embeddings": 4096}, "model.language_model.config.max_position_embeddings"),
    ],
)  # fmt: skip
def test_a_recipe_value_the_checkpoint_disagrees_with_is_an_error_naming_the_key(
    checkpoints, tmp_path, role, values, key
):
    from moe_llava.errors import ConfigError

    siglip = role == "vision_tower" and len(values) == 1  # the CLIP recipe's model_type, a SigLIP path
    vision = str(siglip_checkpoint(tmp_path / "siglip")) if siglip else str(checkpoints["vision"])
    specs = {
        "vision_tower": {"name_or_path": vision},
        "language_model": {"name_or_path": str(checkpoints["lm"])},
    }
    specs[role]["config"] = values
    with pytest.raises(
        ConfigError, match=rf"^{key}: .* disagrees with .*'s config .*checkpoint's config wins"
    ):
        build_model(**specs)


def test_recipe_values_that_agree_with_the_checkpoint_are_fine(checkpoints):
    """The paper recipes' config blocks mirror their checkpoints: agreeing values (and a full CLIP's
    vision half for a clip_vision_model recipe) pass."""
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "image_size": 16, "patch_size": 4}
    lm = {"model_type": "phi", "hidden_size": 32, "num_hidden_layers": 4, "hidden_act": "gelu_new"}
    model = build_model(
        vision_tower={"name_or_path": str(checkpoints["clip_full"]), "config": vision},
        language_model={"name_or_path": str(checkpoints["lm"]), "config": lm},
    )
    assert model.config.text_config.num_hidden_layers == 4
