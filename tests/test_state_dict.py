"""State-dict conversion: exact round trips, PyTorch layouts, config inference, error messages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from regionclip_jax.convert.state_dict import (
    clip_from_state_dict,
    clip_to_state_dict,
    infer_config,
)
from regionclip_jax.models import CLIP, CLIPConfig

# The same tiny configs as tests/test_models.py (one compile of their initialisers per process).
TINY = {
    "resnet": CLIPConfig(32, 64, (1, 1, 1, 1), 16, None, 77, 500, 64, 4, 2),
    "vit": CLIPConfig(32, 64, 2, 128, 16, 77, 500, 64, 4, 2),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    config = TINY[request.param]
    return config, CLIP(config, rngs=nnx.Rngs(0))


def flat_values(model: nnx.Module) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_round_trip_is_exact(tiny):
    config, model = tiny
    sd = clip_to_state_dict(model)
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    # Text heads (4 at width 64) leave no trace in the shapes: everything else is inferred.
    assert infer_config(sd, transformer_heads=4) == config
    assert infer_config(sd).transformer_heads == 1  # OpenAI's width // 64 rule
    again = clip_from_state_dict(sd, config=config)
    ours, back = flat_values(model), flat_values(again)
    assert ours.keys() == back.keys()
    for path, value in ours.items():
        assert back[path].dtype == value.dtype, path
        assert np.array_equal(back[path], value), path
    sd2 = clip_to_state_dict(again)
    assert sd2.keys() == sd.keys()
    assert all(np.array_equal(sd[k], sd2[k]) for k in sd)
    # Also with a bf16 compute model: parameters stay fp32 and bit-identical.
    bf16 = clip_from_state_dict(sd, config=config, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    assert all(np.array_equal(v, flat_values(bf16)[p]) for p, v in ours.items())


def test_pytorch_layouts(tiny):
    """The documented renames and layouts, checked entry by entry against our variables."""
    config, model = tiny
    sd = clip_to_state_dict(model)
    block = model.transformer.resblocks[1]
    w = config.transformer_width
    in_proj = np.asarray(block.attn.in_proj.kernel.get_value())  # [in=W, out=3W]
    assert sd["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * w, w)
    # PyTorch Linear: y = x @ weight.T, so weight[o, i] == kernel[i, o].
    np.testing.assert_array_equal(
        sd["transformer.resblocks.1.attn.in_proj_weight"][5, 7], in_proj[7, 5]
    )
    np.testing.assert_array_equal(
        sd["transformer.resblocks.1.mlp.c_fc.bias"], np.asarray(block.mlp.c_fc.bias.get_value())
    )
    np.testing.assert_array_equal(
        sd["ln_final.weight"], np.asarray(model.ln_final.scale.get_value())
    )
    np.testing.assert_array_equal(
        sd["token_embedding.weight"], np.asarray(model.token_embedding.embedding.get_value())
    )
    assert sd["logit_scale"].shape == ()
    np.testing.assert_allclose(sd["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    # Conv: PyTorch weight[o, i, a, b] == our kernel[a, b, i, o].
    kernel = np.asarray(model.visual.conv1.kernel.get_value())
    weight = sd["visual.conv1.weight"]
    assert weight.shape == (kernel.shape[3], kernel.shape[2], kernel.shape[0], kernel.shape[1])
    assert weight[2, 1, 0, 2] == kernel[0, 2, 1, 2]
    if config.is_resnet:
        bn = model.visual.layer1[0].downsample[1]
        np.testing.assert_array_equal(
            sd["visual.layer1.0.downsample.1.running_var"], np.asarray(bn.var.get_value())
        )
        assert "visual.layer1.0.downsample.0.weight" in sd
        assert "visual.attnpool.q_proj.weight" in sd
    else:
        assert sd["visual.proj"].shape == (config.vision_width, config.embed_dim)
        assert sd["visual.class_embedding"].shape == (config.vision_width,)


def test_dropped_keys_and_errors(tiny):
    config, model = tiny
    sd = clip_to_state_dict(model)
    extras = dict(
        input_resolution=np.array(64), context_length=np.array(77), vocab_size=np.array(500)
    )
    if config.is_resnet:
        extras["visual.bn1.num_batches_tracked"] = np.array(0)
    clip_from_state_dict({**sd, **extras}, config=config)  # accepted, ignored

    missing = dict(sd)
    del missing["transformer.resblocks.0.ln_2.bias"]
    with pytest.raises(ValueError, match=r"missing key 'transformer\.resblocks\.0\.ln_2\.bias'"):
        clip_from_state_dict(missing, config=config)

    wrong = dict(sd, text_projection=np.zeros((64, 31), np.float32))
    with pytest.raises(
        ValueError, match=r"text_projection: expected shape \(64, 32\), found \(64, 31\)"
    ):
        clip_from_state_dict(wrong, config=config)

    with pytest.raises(ValueError, match=r"unexpected key 'visual\.extra\.weight'"):
        clip_from_state_dict(dict(sd, **{"visual.extra.weight": np.zeros(3)}), config=config)

    # A config that disagrees with the tensors (one text layer too many).
    with pytest.raises(ValueError, match=r"missing key 'transformer\.resblocks\.2\."):
        clip_from_state_dict(sd, config=config.replace(transformer_layers=3))

    no_ln = {k: v for k, v in sd.items() if k != "ln_final.weight"}
    with pytest.raises(ValueError, match=r"'ln_final\.weight'"):
        infer_config(no_ln)
    key = "visual.positional_embedding" if not config.is_resnet else "visual.layer1.0.conv1.weight"
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        infer_config({k: v for k, v in sd.items() if k != key})


@pytest.mark.torch_ref
def test_accepts_torch_tensors_of_any_float_dtype(tiny):
    torch = pytest.importorskip("torch")
    config, model = tiny
    sd = clip_to_state_dict(model)
    tensors = {}
    for i, (k, v) in enumerate(sd.items()):
        t = torch.from_numpy(v.copy())
        # Half-precision checkpoints (OpenAI's JIT files are fp16) are widened on load.
        tensors[k] = t.to(
            torch.float16 if i % 3 == 1 else torch.bfloat16 if i % 3 == 2 else t.dtype
        )
    loaded = clip_to_state_dict(clip_from_state_dict(tensors, config=config))
    for k, t in tensors.items():
        assert loaded[k].dtype == np.float32, k
        np.testing.assert_array_equal(loaded[k], t.float().numpy(), err_msg=k)
