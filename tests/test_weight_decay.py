"""One weight-decay rule for every family: no decay for biases, norm gains, token and position embeddings and
CLIP's logit scale; every other matrix decayed. Checked on tiny models built from config, by parameter name."""

import pytest

from pretrain.models import clip, clip_classify, get_family, gpt
from pretrain.run.config import ModelConfig, VisionConfig
from pretrain.runtime.engine import param_groups


def _split(model, family) -> tuple[set[str], set[str]]:
    decay, plain = param_groups(model, 0.1, get_family(family).no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in plain["params"]}


def _gpt(arch: str, tie: bool = True):
    cfg = ModelConfig(
        arch=arch, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=16, tie_word_embeddings=tie
    )
    return gpt.build_model(cfg, gpt.hf_config(cfg, 100, 0))


CLIP_CFG = ModelConfig(
    arch="clip",
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=8,
    projection_dim=16,
    vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2),
)


def test_gpt2_embeddings_norms_and_biases_are_not_decayed():
    decay, plain = _split(_gpt("gpt2"), "gpt")
    block = "transformer.h.0."
    assert decay == {block + m + ".weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        block + "ln_1.weight",
        block + "ln_2.bias",
        block + "attn.c_attn.bias",
        block + "mlp.c_proj.bias",
    } <= plain


@pytest.mark.parametrize("tie", [True, False])
def test_llama_token_embeddings_and_norms_are_not_decayed_an_untied_head_is(tie):
    decay, plain = _split(_gpt("llama", tie), "gpt")
    layer = "model.layers.0."
    projections = {layer + f"self_attn.{p}_proj.weight" for p in "qkvo"}
    projections |= {layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert decay == projections | (set() if tie else {"lm_head.weight"})
    assert plain == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        layer + "input_layernorm.weight",
        layer + "post_attention_layernorm.weight",
    }


def test_clip_embeddings_logit_scale_norms_and_biases_are_not_decayed():
    decay, plain = _split(clip.build_model(CLIP_CFG, clip.hf_config(CLIP_CFG, 100)), "clip")
    for tower in ("text_model", "vision_model"):
        layer = f"clip.{tower}.encoder.layers.0."
        assert {layer + f"self_attn.{p}_proj.weight" for p in "qkv"} | {layer + "mlp.fc1.weight"} <= decay
        assert {
            f"clip.{tower}.embeddings.position_embedding.weight",
            layer + "layer_norm1.weight",
            layer + "mlp.fc1.bias",
        } <= plain
    assert {
        "clip.vision_model.embeddings.patch_embedding.weight",
        "clip.visual_projection.weight",
        "clip.text_projection.weight",
    } <= decay, "the patch projection is a linear layer, not a table"
    assert {
        "clip.logit_scale",
        "clip.text_model.embeddings.token_embedding.weight",
        "clip.vision_model.embeddings.class_embedding",
        "clip.vision_model.pre_layrnorm.weight",
    } <= plain
    assert all(n.endswith(".weight") and "norm" not in n for n in decay)


def test_a_classifier_heads_weight_is_decayed_its_bias_not():
    cfg = clip.hf_config(CLIP_CFG, 100)
    model = clip_classify.ClassifierCLIP(clip.build_model(CLIP_CFG, cfg).clip, num_classes=5)
    decay, plain = _split(model, "clip-classify")
    assert "head.weight" in decay and "head.bias" in plain and "clip.logit_scale" in plain


def test_zero3_partitioned_parameters_are_judged_by_their_full_shape():
    """Built under deepspeed.zero.Init every local tensor is empty and 1-d; the rule reads ds_shape."""
    import deepspeed

    from tests.launch import world_of_one

    cfg = ModelConfig(arch="gpt2", hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=16)
    config = gpt.hf_config(cfg, 100, 0)
    reference = _split(gpt.model_from_config(config), "gpt")
    with world_of_one():
        with deepspeed.zero.Init(
            config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        ):
            model = gpt.model_from_config(config)
        assert all(p.ndim == 1 and p.numel() == 0 for p in model.parameters()), "partitioned on build"
        assert _split(model, "gpt") == reference
