"""Random open_clip models: the independent PyTorch references the parity tests compare against.

torch and open_clip are imported inside the functions: they are optional (leg 2 has no PyTorch;
callers skip first with `pytest.importorskip`).
"""

from __future__ import annotations


def randomize_(torch_model, seed: int = 1) -> None:
    """Randomises every 1-D float parameter/buffer (BN/LN scales, biases, BN statistics) in place.

    BN running variances ~ U(0.5, 1.5), other `weight`s ~ U(0.75, 1.25), the rest ~ N(0, 0.1),
    drawn in `named_parameters()` then `named_buffers()` order from one generator seeded `seed`.
    """
    import torch  # optional: the leg without PyTorch never calls this

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(torch_model.named_parameters()) + list(torch_model.named_buffers())
        for name, t in tensors:
            if t.ndim != 1 or not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def open_clip_model(
    embed_dim: int, vision_cfg: dict, text_cfg: dict, seed: int = 0, quick_gelu: bool = True
):
    """An `open_clip.model.CLIP` in eval mode: initialised under `torch.manual_seed(seed)`, then
    its 1-D tensors randomised by `randomize_(model, seed + 1)`."""
    import open_clip  # optional: the leg without PyTorch never calls this
    import torch

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu).eval()
    # OpenAI's models use QuickGELU; open_clip's default is nn.GELU.
    expected = "QuickGELU" if quick_gelu else "GELU"
    assert type(model.transformer.resblocks[0].mlp.gelu).__name__ == expected
    randomize_(model, seed + 1)
    return model
