"""Prompt-ensemble class/concept embeddings (RegionCLIP `tools/extract_concept_features.py`).

For each class name, every prompt template is filled in, tokenized and encoded by the text tower,
and the embeddings are averaged. As in RegionCLIP (spec §3) the per-prompt embeddings are NOT
L2-normalised before the mean and the mean is NOT normalised: consumers (the detector's classifier,
the pretraining losses) normalise at use time. `normalize_prompts=True` gives the other common
recipe (normalise each prompt, mean, normalise again: OpenAI CLIP's zero-shot classifier and an
earlier revision of RegionCLIP's script).

`clip_text_embeddings(clip, names, templates)` is the one way from class names to embeddings with a
CLIP model (pretraining concepts, detection classes, the recognizer's vocabularies, the demo);
`prompt_ensemble_embeddings(encode_text, names)` is the same with any text encoder function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from regionclip_jax.models.split import SplitJit
from regionclip_jax.text.templates import TEMPLATES, expand_templates
from regionclip_jax.text.tokenizer import CONTEXT_LENGTH, Tokenizer, TruncateMode


def _normalize_names(names) -> list[list[str]]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Sequence):
        raise TypeError(f"names must be a sequence, got {type(names).__name__}")
    if len(names) == 0:
        raise ValueError("names is empty: need at least one class name")
    out = []
    for i, n in enumerate(names):
        synonyms = [n] if isinstance(n, str) else n
        if (
            isinstance(synonyms, bytes)
            or not isinstance(synonyms, Sequence)
            or not synonyms
            or not all(isinstance(s, str) for s in synonyms)
        ):
            raise TypeError(
                f"names[{i}] must be a str or a non-empty sequence of str, got {n!r:.60}"
            )
        out.append(list(synonyms))
    return out


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prompt_ensemble_embeddings(
    encode_text: Callable,
    names: Sequence[str | Sequence[str]],
    *,
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 256,
    context_length: int = CONTEXT_LENGTH,
    truncate: TruncateMode = "clip",
    show_progress: bool = False,
    clean_names: bool = True,
    normalize_prompts: bool = False,
    jit: bool = True,
) -> np.ndarray:
    """Mean text embedding of every class name over the prompt templates.

    Args:
      encode_text: int32 [B, context_length] token ids -> float [B, D] embeddings (the text
        tower, e.g. `lambda ids: model.encode_text(ids)`). It is always called with
        B = `batch_size`: the last batch is padded with copies of its first row and the padded
        outputs are dropped, so a jitted function compiles once.
      names: C class names. An element may also be a sequence of synonyms; its embedding is then
        the mean over all synonyms x templates (as RegionCLIP's `pre_tokenize` does for lists).
      templates: prompt templates with one '{}' each (default: RegionCLIP's 81).
      batch_size: prompts per `encode_text` call.
      context_length, truncate: passed to the tokenizer (prompts rarely reach 77 tokens).
      show_progress: show a tqdm bar over prompts.
      clean_names: apply RegionCLIP's `clean_class_name` (drop ',', '+' -> ' ') to each name.
      normalize_prompts: L2-normalise each prompt embedding before the mean and the mean after it
        (not RegionCLIP's released recipe; see the module doc).
      jit: wrap `encode_text` in `jax.jit` (turn off when it is already compiled, e.g. an
        `nnx.jit` function closing over a model).

    Returns:
      float32 [C, D]: row c is the mean over the prompts of names[c] (accumulated in float64).

    Raises:
      ValueError: empty `names` or `templates`, batch_size < 1, or an output of the wrong shape.
      TypeError: a name that is not a str (or a sequence of str).
    """
    groups = _normalize_names(names)
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Expand everything up front (strings only, a few MB even for LVIS x 81) so that errors in
    # names/templates show before any device work.
    prompts: list[tuple[int, str]] = [
        (c, p)
        for c, synonyms in enumerate(groups)
        for s in synonyms
        for p in expand_templates(s, templates, clean=clean_names)
    ]
    fn = encode_text
    if jit:
        fn = jax.jit(encode_text)
    tokenizer = Tokenizer(context_length=context_length, truncate=truncate)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = tokenizer.tokenize([p for _, p in chunk])
            n = len(chunk)
            if n < batch_size:
                # Copies of a real prompt rather than zero rows, so padding never feeds the
                # encoder a degenerate sequence (no SOT/EOT).
                ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - n, axis=0)])
            yield ids, np.array([c for c, _ in chunk], np.int64), n

    sums: np.ndarray | None = None
    counts = np.zeros(len(groups), np.int64)

    def accumulate(out, cls_idx, n):
        nonlocal sums
        emb = np.asarray(out)
        if emb.ndim != 2 or emb.shape[0] != batch_size:
            raise ValueError(
                f"encode_text must return [batch_size={batch_size}, D], got shape {emb.shape}"
            )
        emb = emb[:n].astype(np.float64)
        if normalize_prompts:
            emb = _l2_normalize(emb)
        if sums is None:
            sums = np.zeros((len(groups), emb.shape[1]), np.float64)
        np.add.at(sums, cls_idx, emb)
        np.add.at(counts, cls_idx, 1)

    progress = None
    if show_progress:
        progress = tqdm(total=len(prompts), unit="prompt", desc="prompt ensemble")
    pending = None
    try:
        for ids, cls_idx, n in batches():
            # JAX dispatches asynchronously: tokenizing the next batch overlaps with encoding
            # this one; the previous result is pulled to the host only after the next dispatch.
            out = fn(ids)
            if pending is not None:
                accumulate(*pending)
            pending = (out, cls_idx, n)
            if progress is not None:
                progress.update(n)
        accumulate(*pending)
    finally:
        if progress is not None:
            progress.close()

    mean = sums / counts[:, None]
    if normalize_prompts:
        mean = _l2_normalize(mean)
    return mean.astype(np.float32)


# `templates` by name: RegionCLIP's 81-prompt ensemble, or CLIP's single prompt.
NAMED_TEMPLATES = {"ensemble": TEMPLATES, "single": ("a photo of a {}.",)}


def clip_text_embeddings(
    clip: Any,
    names: Sequence[str | Sequence[str]],
    templates: str | Sequence[str] = "ensemble",
    *,
    encode_text: Callable | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Prompt-ensemble embeddings of class names from a CLIP model's text tower.

    Args:
      clip: a `models.clip.CLIP` (its `encode_text` and `config.context_length` are used).
      names: C class names (or lists of synonyms), as `prompt_ensemble_embeddings` takes them.
      templates: "ensemble" (RegionCLIP's 81 prompts), "single" ("a photo of a {}."), or the
        templates themselves.
      encode_text: the compiled text tower to use (default: `clip.encode_text` compiled once with
        `models.split.SplitJit`); pass one to reuse its compilation across calls.
      show_progress: a progress bar over the prompts.

    Returns:
      float32 `[C, D]` un-normalised mean embeddings (normalise at use, as the original).
    """
    if isinstance(templates, str):
        if templates not in NAMED_TEMPLATES:
            raise ValueError(
                f"templates must be one of {sorted(NAMED_TEMPLATES)}, got {templates!r}"
            )
        templates = NAMED_TEMPLATES[templates]
    if encode_text is None:
        encode_text = SplitJit(clip, lambda m, ids: m.encode_text(ids).astype(jnp.float32))
    return prompt_ensemble_embeddings(
        encode_text,
        names,
        templates=templates,
        context_length=clip.config.context_length,
        show_progress=show_progress,
        jit=False,
    )
