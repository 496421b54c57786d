"""Optimisers as config data: SGD momentum (detectron2 / RegionCLIP) or AdamW (CLIP), warmup +
step learning-rate schedule, per-parameter gradient-norm clipping and freezing by regex.

`config.optim` fields (see `config_lib.base_config`):
  name: "sgd" (torch.optim.SGD semantics: weight decay added to the gradient, then momentum
    buffer `b = m b + g`, update `-lr b`) or "adamw" (decoupled weight decay, CLIP's choice).
  lr: base learning rate for the configured global batch size (RegionCLIP: 0.002 at batch 96;
    scale linearly with the batch size, detectron2's rule).
  momentum, beta1, beta2, eps: SGD momentum / Adam moments.
  weight_decay: decay coefficient; parameters with fewer than `decay_min_ndim` dimensions
    (biases, norm scales, logit_scale) are not decayed when decay_min_ndim = 2 (CLIP), all are
    when it is 0 (detectron2's default for non-norm parameters; RegionCLIP's norms are frozen).
  warmup_steps, warmup_factor: detectron2 `WarmupMultiStepLR` linear warmup: the factor goes
    from warmup_factor at step 0 to 1 at warmup_steps.
  decay_steps, decay_factor: the lr is multiplied by decay_factor at each step in decay_steps
    (e.g. (300_000, 525_000) and 0.1).
  clip_grad_norm: per-parameter clipping (detectron2 CLIP_TYPE "norm" applies
    `clip_grad_norm_` to each parameter tensor separately): g *= min(1, c / (||g|| + 1e-6)).
    0 disables.
  freeze: regexes matched (re.search) against '/'-joined parameter paths, e.g.
    ("^visual/(conv|bn)[123]/", "^visual/layer1/"); matching parameters get no update and keep no
    optimiser state.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from regionclip_jax.models.split import path_str


def param_paths(params: Any) -> Any:
    """A tree like `params` holding each leaf's '/'-joined path."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), params)


def lr_schedule(optim: Any) -> Callable[[jax.Array], jax.Array]:
    """detectron2 WarmupMultiStepLR: lr * warmup(step) * decay_factor ** #(decay_steps <= step)."""
    base = float(optim.lr)
    warmup = int(optim.warmup_steps)
    wf = float(optim.warmup_factor)
    steps = sorted(int(s) for s in optim.decay_steps)
    gamma = float(optim.decay_factor)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup > 0:
            alpha = jnp.minimum(step / warmup, 1.0)
            factor = jnp.where(step < warmup, wf * (1.0 - alpha) + alpha, 1.0)
        else:
            factor = 1.0
        n = sum((step >= s).astype(jnp.float32) for s in steps) if steps else 0.0
        return base * factor * gamma**n

    return schedule


def lr_at(optim: Any, step: int) -> float:
    """The schedule in plain Python (for tests and logging)."""
    warmup, wf = int(optim.warmup_steps), float(optim.warmup_factor)
    factor = 1.0
    if step < warmup:
        alpha = step / warmup
        factor = wf * (1 - alpha) + alpha
    n = bisect.bisect_right(sorted(int(s) for s in optim.decay_steps), step)
    return float(optim.lr) * factor * float(optim.decay_factor) ** n


def clip_by_norm_per_param(max_norm: float) -> optax.GradientTransformation:
    """Clips each gradient leaf to L2 norm <= max_norm (torch `clip_grad_norm_` per tensor)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params

        def one(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
            return (g * coef).astype(g.dtype)

        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(init, update)


def resnet_freeze_patterns(prefix: str, freeze_at: int) -> tuple[str, ...]:
    """Regexes of a ModifiedResNet's stages that detectron2's FREEZE_AT freezes: the stem
    (freeze_at >= 1) and layer1..layer(freeze_at - 1), for the tower at path `prefix`."""
    out = [rf"^{prefix}/(conv[123]|bn[123])/"] if freeze_at >= 1 else []
    return tuple(out + [rf"^{prefix}/layer{i}/" for i in range(1, min(freeze_at, 5))])


def resnet_norm_patterns(prefix: str) -> tuple[str, ...]:
    """Regexes of every norm's scale/bias in the ModifiedResNet at path `prefix` (stem, blocks and
    downsample branches). detectron2's FrozenBN keeps them as buffers, so the original never trains
    them; ours are parameters (so that from-scratch ShapesWorld CLIPs can learn them)."""
    return (rf"^{prefix}/(.*/)?(bn\d|downsample/1)/",)


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
    """Tree of bools like `params`: True where a freeze regex matches the parameter's path."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree.map(lambda s: any(c.search(s) for c in compiled), param_paths(params))


def make_optimizer(optim: Any, params: Any) -> optax.GradientTransformation:
    """The optax transformation `config.optim` describes, for parameters shaped like `params`.

    Args:
      optim: the `config.optim` ConfigDict (module docstring).
      params: parameter pytree (arrays or ShapeDtypeStructs); only paths and ranks are read.
    """
    schedule = lr_schedule(optim)
    min_ndim = int(optim.decay_min_ndim)
    decay_mask = jax.tree.map(lambda p: len(p.shape) >= min_ndim, params)
    chain = []
    if float(optim.clip_grad_norm) > 0:
        chain.append(clip_by_norm_per_param(float(optim.clip_grad_norm)))
    if optim.name == "sgd":
        if float(optim.weight_decay) > 0:
            chain.append(optax.add_decayed_weights(float(optim.weight_decay), decay_mask))
        chain.append(optax.sgd(schedule, momentum=float(optim.momentum) or None))
    elif optim.name == "adamw":
        chain.append(
            optax.adamw(
                schedule,
                b1=float(optim.beta1),
                b2=float(optim.beta2),
                eps=float(optim.eps),
                weight_decay=float(optim.weight_decay),
                mask=decay_mask,
            )
        )
    else:
        raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {optim.name!r}")
    tx = optax.chain(*chain)
    if optim.freeze:
        frozen = frozen_mask(params, tuple(optim.freeze))
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
