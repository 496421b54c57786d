"""CLIP towers: parity with open_clip (random weights), presets, logical axes, bf16 compute.

The reference is open_clip's PyTorch CLIP (an independent implementation of OpenAI's model) with
QuickGELU; its weights are random, with BN running statistics, norm scales and all biases
randomised too (default init leaves mean=0, var=1, bias=0 and would hide layout bugs).
Errors are reported as max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_reference import open_clip_model

from regionclip_jax.convert.state_dict import (
    clip_from_state_dict,
    clip_to_state_dict,
    infer_config,
    state_dict_shapes,
)
from regionclip_jax.models import CLIP, PRESETS, CLIPConfig, ModifiedResNet, VisionTransformer
from regionclip_jax.models.presets import get_preset
from regionclip_jax.parallel import logical_axes_of

# open_clip model-config names of OpenAI's presets.
OPEN_CLIP_NAMES = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336": "ViT-L-14-336",
}

TINY_RN_VISION = dict(layers=[1, 1, 1, 1], width=16, image_size=64)
TINY_VIT_VISION = dict(layers=2, width=128, patch_size=16, image_size=64)
# Text heads 4 at width 64 differ from OpenAI's width//64 rule: exercises the config override.
TINY_TEXT_RN = dict(width=64, heads=4, layers=2, vocab_size=500)
TINY_TEXT_VIT = dict(width=128, heads=2, layers=2, vocab_size=500)


@functools.cache
def abstract_preset(name: str) -> CLIP:
    """A preset CLIP with shapes and metadata only (`nnx.eval_shape`: no weights, no init)."""
    return nnx.eval_shape(lambda: CLIP.from_preset(name, rngs=nnx.Rngs(0)))


def random_clip(config: CLIPConfig, *, seed: int = 0) -> CLIP:
    """A CLIP with random weights drawn in NumPy (skips compiling an initialiser per shape).

    Kernels ~ N(0, 1/fan_in); norm scales and BN variances ~ U(0.75, 1.25) (BN scales are not
    zero as in the real init, so every residual branch contributes); other vectors ~ N(0, 0.1).
    """
    rng = np.random.RandomState(seed)
    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if path[-1] in ("scale", "var"):
            value = rng.uniform(0.75, 1.25, shape)
        elif path[-1] == "logit_scale":
            value = np.log(1 / 0.07)
        elif len(shape) >= 2:
            value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = rng.randn(*shape) * 0.1
        var.set_value(jnp.asarray(value, dtype))
    return model


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------- torch helpers


def open_clip_preset(name: str):
    import open_clip

    cfg = open_clip.get_model_config(OPEN_CLIP_NAMES[name])
    return open_clip_model(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])


def make_tokens(vocab_size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """int64 [batch, 77]: SOT, random ids, EOT (= vocab_size - 1, the largest id), zeros."""
    rng = np.random.RandomState(seed)
    tokens = np.zeros((batch, 77), np.int64)
    for i in range(batch):
        n = rng.randint(3, 20)
        tokens[i, 0] = vocab_size - 2
        tokens[i, 1 : n - 1] = rng.randint(1, vocab_size - 2, n - 2)
        tokens[i, n - 1] = vocab_size - 1
    return tokens


def torch_image(x: np.ndarray):
    import torch

    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def nchw_to_nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def jitted(model: nnx.Module, method: str):
    """`model.method` under jax.jit (one compile instead of op-by-op dispatch)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return lambda *args: run(state, *args)


def check_clip_parity(torch_model, config: CLIPConfig | None, tol: float, batch: int = 2):
    import torch

    ours = clip_from_state_dict(torch_model.state_dict(), config=config)
    res = ours.config.image_resolution
    images = np.random.RandomState(0).randn(batch, res, res, 3).astype(np.float32)
    tokens = make_tokens(ours.config.vocab_size, batch=2)
    with torch.no_grad():
        ref_img = torch_model.encode_image(torch_image(images)).numpy()
        ref_txt = torch_model.encode_text(torch.from_numpy(tokens)).numpy()
    img = jitted(ours, "encode_image")(jnp.asarray(images))
    txt = jitted(ours, "encode_text")(jnp.asarray(tokens, jnp.int32))
    assert rel_err(img, ref_img) <= tol
    assert rel_err(txt, ref_txt) <= tol
    return ours, images, tokens, ref_img, ref_txt


# ----------------------------------------------------------------------------- presets


def test_presets_json_round_trip_and_errors():
    for name, cfg in PRESETS.items():
        again = CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg, name
    assert get_preset("RN50").vision_heads == 32
    assert get_preset("RN50x4").vision_heads == 40
    assert get_preset("ViT-L/14").vision_heads == 16
    assert get_preset("ViT-B/16").is_resnet is False
    with pytest.raises(ValueError, match="RN50x4"):  # the message lists the valid names
        get_preset("RN51")
    with pytest.raises(ValueError, match="vision_patch_size"):
        CLIPConfig(512, 224, 12, 768, None)


@pytest.mark.torch_ref
def test_presets_match_open_clip_configs():
    open_clip = pytest.importorskip("open_clip")
    for name, cfg in PRESETS.items():
        ref = open_clip.get_model_config(OPEN_CLIP_NAMES[name])
        v, t = ref["vision_cfg"], ref["text_cfg"]
        layers = tuple(v["layers"]) if isinstance(v["layers"], list) else v["layers"]
        expected = CLIPConfig(
            embed_dim=ref["embed_dim"],
            image_resolution=v["image_size"],
            vision_layers=layers,
            vision_width=v["width"],
            vision_patch_size=v.get("patch_size"),
            context_length=t.get("context_length", 77),
            vocab_size=t.get("vocab_size", 49408),
            transformer_width=t["width"],
            transformer_heads=t["heads"],
            transformer_layers=t["layers"],
        )
        assert cfg == expected, name


@pytest.mark.torch_ref
def test_preset_state_shapes_match_open_clip():
    """Preset variables map 1:1 onto open_clip's state dict with the same shapes (a ResNet with
    a non-power-of-2 width, RN50x4; both ViT patch sizes). All presets' hyper-parameters are
    checked against open_clip's configs above."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    for name in ("RN50", "RN50x4", "ViT-B/32", "ViT-L/14"):
        ours = state_dict_shapes(abstract_preset(name))
        ref_cfg = open_clip.get_model_config(OPEN_CLIP_NAMES[name])
        with torch.device("meta"):  # shapes only, no memory, no init cost
            ref = open_clip.model.CLIP(**ref_cfg, quick_gelu=True)
        ref_shapes = {
            k: tuple(v.shape)
            for k, v in ref.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        assert ours == ref_shapes, name


def test_resnet_visual_tensor_counts():
    """Spec §7.3: RN50 has 284 visual tensors (without num_batches_tracked), RN50x4 434."""
    for name, expected in (("RN50", 284), ("RN50x4", 434)):
        shapes = state_dict_shapes(abstract_preset(name))
        visual = [k for k in shapes if k.startswith("visual.")]
        assert len(visual) == expected, name
    rn50 = state_dict_shapes(abstract_preset("RN50"))
    # A few rows of the spec §7.3 table (PyTorch layout).
    assert rn50["visual.conv1.weight"] == (32, 3, 3, 3)
    assert rn50["visual.layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert rn50["visual.attnpool.positional_embedding"] == (50, 2048)
    assert rn50["visual.attnpool.c_proj.weight"] == (1024, 2048)
    assert rn50["transformer.resblocks.11.attn.in_proj_weight"] == (1536, 512)
    assert rn50["text_projection"] == (512, 1024)


KNOWN_PARAM_AXES = {
    "embed",
    "mlp",
    "heads",
    "vocab",
    "conv_in",
    "conv_out",
    "kernel",
    "pos",
    "norm",
    "proj",
    None,
}


@pytest.mark.parametrize("name", ["RN50", "ViT-B/32"])
def test_every_variable_has_logical_axes(name):
    model = abstract_preset(name)
    flat = list(nnx.to_flat_state(nnx.state(model)))
    assert len(flat) > 100
    for path, var in flat:
        names = var.get_metadata().get("out_sharding")
        assert names is not None, f"{path} has no logical axis names"
        assert len(names) == len(var.get_value().shape), (path, names)
        assert set(names) <= KNOWN_PARAM_AXES, (path, names)
    # The sharding helper sees the same names (e.g. the text MLP is tensor-parallel).
    axes = logical_axes_of(model)
    assert tuple(axes["transformer"]["resblocks"][0]["mlp"]["c_fc"]["kernel"]) == ("embed", "mlp")


# ----------------------------------------------------------------------------- parity: tiny


@pytest.mark.torch_ref
def test_tiny_resnet_clip_matches_open_clip():
    import torch

    tm = open_clip_model(32, TINY_RN_VISION, TINY_TEXT_RN)
    config = infer_config(tm.state_dict(), transformer_heads=TINY_TEXT_RN["heads"])
    ours, images, tokens, _, _ = check_clip_parity(tm, config, tol=1e-5)
    # The full forward: logit_scale * normalised image @ normalised text.
    with torch.no_grad():
        img_f, txt_f, scale = tm(torch_image(images), torch.from_numpy(tokens))
        ref_logits = (scale * img_f @ txt_f.T).numpy()
    logits_img, logits_txt = ours(jnp.asarray(images), jnp.asarray(tokens, jnp.int32))
    assert rel_err(logits_img, ref_logits) <= 1e-5
    np.testing.assert_array_equal(logits_txt, np.asarray(logits_img).T)


@pytest.mark.torch_ref
def test_gelu_activation_option_matches_open_clip_gelu_models():
    """open_clip's own ViT trainings use exact GELU; the shapes cannot tell, the option must."""
    tm = open_clip_model(32, TINY_VIT_VISION, TINY_TEXT_VIT, quick_gelu=False)
    sd = tm.state_dict()
    heads = TINY_TEXT_VIT["heads"]
    check_clip_parity(tm, infer_config(sd, transformer_heads=heads, activation="gelu"), 1e-5)
    # The default (QuickGELU) on the same weights is measurably wrong: the option is load-bearing.
    with pytest.raises(AssertionError):
        check_clip_parity(tm, infer_config(sd, transformer_heads=heads), 1e-3)
    with pytest.raises(ValueError, match="activation"):
        infer_config(sd, activation="relu")


@pytest.mark.torch_ref
def test_tiny_vit_clip_matches_open_clip():
    import torch

    tm = open_clip_model(32, TINY_VIT_VISION, TINY_TEXT_VIT)
    ours, images, tokens, _, ref_txt = check_clip_parity(tm, None, tol=1e-5)
    assert isinstance(ours.visual, VisionTransformer)
    # tokens(): the post-transformer tokens, captured from open_clip's transformer output.
    captured = {}
    hook = tm.visual.transformer.register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        tm.encode_image(torch_image(images))
    hook.remove()
    assert rel_err(ours.visual.tokens(jnp.asarray(images)), captured["out"].numpy()) <= 1e-5
    # Causal attention: dropping trailing padding leaves the EOT embedding unchanged.
    short = ours.encode_text(jnp.asarray(tokens[:, :24], jnp.int32))
    assert rel_err(short, ref_txt) <= 1e-5


@pytest.mark.torch_ref
def test_resnet_parts_match_open_clip_stages():
    """trunk / res5 / attnpool / features against open_clip's stem, layer1-4 and attnpool."""
    import torch

    tm = open_clip_model(32, TINY_RN_VISION, TINY_TEXT_RN)
    config = infer_config(tm.state_dict(), transformer_heads=TINY_TEXT_RN["heads"])
    visual = clip_from_state_dict(tm.state_dict(), config=config).visual
    assert isinstance(visual, ModifiedResNet)
    # 72 is not a multiple of 32: checks floor pooling; batch 2.
    images = np.random.RandomState(3).randn(2, 72, 72, 3).astype(np.float32)
    v = tm.visual
    with torch.no_grad():
        ref = {}
        x = v.stem(torch_image(images))
        for i, layer in enumerate((v.layer1, v.layer2, v.layer3, v.layer4)):
            x = layer(x)
            ref[f"res{i + 2}"] = nchw_to_nhwc(x)
        # attnpool needs res/32 = 2: run it on the first 2x2 cells of res5.
        ref_pool = v.attnpool(x[:, :, :2, :2]).numpy()
    feats = visual.features(jnp.asarray(images))
    assert feats["res2"].shape == (2, 18, 18, 64)
    assert feats["res5"].shape == (2, 2, 2, 512)
    for key in ("res2", "res3", "res4", "res5"):
        assert rel_err(feats[key], ref[key]) <= 1e-5, key
    res4 = visual.trunk(jnp.asarray(images))
    assert rel_err(res4, ref["res4"]) <= 1e-5
    res5 = visual.res5(res4)
    assert rel_err(res5, ref["res5"]) <= 1e-5
    assert rel_err(visual.attnpool(res5[:, :2, :2]), ref_pool) <= 1e-5
    # Composition: __call__ == attnpool(res5(trunk(x))) at the native resolution.
    native = jnp.asarray(images[:, :64, :64])
    np.testing.assert_allclose(
        visual(native), visual.attnpool(visual.res5(visual.trunk(native))), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="positional_embedding"):
        visual.attnpool(res5[:, :1, :2])


# ----------------------------------------------------------------------------- parity: presets


@pytest.mark.torch_ref
@pytest.mark.parametrize(
    "name",
    [
        "RN50",
        "ViT-B/32",
        pytest.param("RN50x4", marks=pytest.mark.slow),  # the largest: ~12 s cold on 2 cores
        "ViT-B/16",
    ],
)
def test_preset_matches_open_clip(name):
    tm = open_clip_preset(name)
    ours, *_ = check_clip_parity(tm, None, tol=1e-4, batch=1)
    assert ours.config == get_preset(name)


# ----------------------------------------------------------------------------- bf16 compute

# max|bf16 - fp32| / max|fp32| of embeddings and logits. bf16 keeps 8 mantissa bits (0.4% per
# rounding); measured on these tiny models (jax 0.10.2 and 0.12.0.1): 0.5-1.6% for embeddings,
# 1.4-2.2% for logits.
BF16_TOL = 5e-2


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_bf16_compute_close_to_fp32(vision):
    if vision == "resnet":
        config = CLIPConfig(32, 64, (1, 1, 1, 1), 16, None, 77, 500, 64, 4, 2)
    else:
        config = CLIPConfig(32, 64, 2, 128, 16, 77, 500, 64, 4, 2)
    f32 = random_clip(config)
    bf16 = clip_from_state_dict(clip_to_state_dict(f32), config=config, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16)))  # params fp32
    images = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
    tokens = jnp.asarray(make_tokens(500), jnp.int32)

    def run(model):
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, images, tokens):
            m = nnx.merge(graphdef, state)
            return m.encode_image(images), m.encode_text(tokens), m(images, tokens)[0]

        return forward(state, images, tokens)

    img16, txt16, logits16 = run(bf16)
    img32, txt32, logits32 = run(f32)
    assert img16.dtype == txt16.dtype == jnp.bfloat16
    assert logits16.dtype == jnp.float32
    assert rel_err(img16, img32) <= BF16_TOL
    assert rel_err(txt16, txt32) <= BF16_TOL
    assert rel_err(logits16, logits32) <= BF16_TOL
