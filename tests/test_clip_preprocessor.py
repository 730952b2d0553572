"""A CLIP fine-tuned from a checkpoint whose preprocessor is not OpenAI's (other mean / std) trains,
evaluates and exports with that checkpoint's statistics (issue 23, smaller)."""

from __future__ import annotations

import json

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from data_pipelines.image.transforms import normalize_batch, to_tensor_normalized
from pretrain.models import clip
from pretrain.run.config import ModelConfig

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # SigLIP-style statistics


def _checkpoint(path):
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return path


def test_the_checkpoints_pixel_statistics_are_used_in_training_evaluation_and_export(tmp_path):
    from PIL import Image

    init = _checkpoint(tmp_path / "init")
    config = clip.model_config(ModelConfig(arch="clip", init_from=str(init)), None)
    model = clip.build_model(ModelConfig(arch="clip", init_from=str(init)), config).eval()
    assert model.pixel_mean == tuple(MEAN) and model.pixel_std == tuple(STD)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    expected = (pixels.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        want = clip.F.normalize(
            model.clip.visual_projection(model.clip.vision_model(pixel_values=expected).pooler_output), dim=-1
        )
        # the training stream's uint8, and the eval loaders' pixels (normalised with OpenAI's statistics)
        torch.testing.assert_close(model.encode_image(pixels), want)
        openai = torch.stack([to_tensor_normalized(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
        torch.testing.assert_close(model.encode_image(openai), want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(normalize_batch(pixels), expected), "OpenAI's statistics differ"
    out = tmp_path / "export"
    hf = clip.to_hf(model)
    hf.save_pretrained(out)
    clip.save_hf_assets(hf, None, out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == MEAN and pre["image_std"] == STD
    again = clip.from_pretrained(out)
    assert again.pixel_mean == tuple(MEAN), "an export reloads with its statistics"
