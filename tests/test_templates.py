"""Prompt templates, class-name cleaning and prompt-ensemble embeddings (vs a NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest

from regionclip_jax.text import (
    TEMPLATES,
    clean_class_name,
    clean_lvis_name,
    expand_templates,
    get_prompt_templates,
    prompt_ensemble_embeddings,
    tokenize,
)


def test_templates_list():
    assert len(TEMPLATES) == 81
    assert len(set(TEMPLATES)) == 81
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert TEMPLATES[:3] == ("{}.", "a photo of a {}.", "a bad photo of a {}.")
    assert TEMPLATES[-1] == "a tattoo of the {}."
    assert get_prompt_templates() == list(TEMPLATES)
    assert get_prompt_templates() is not get_prompt_templates()


@pytest.mark.torch_ref
def test_templates_are_clip_imagenet_plus_bare():
    pytest.importorskip("open_clip")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    clip80 = {f("{}") for f in OPENAI_IMAGENET_TEMPLATES}
    assert len(clip80) == 80
    assert set(TEMPLATES) == clip80 | {"{}."}


def test_name_cleaning():
    assert clean_class_name("hot dog, frankfurter") == "hot dog frankfurter"
    assert clean_class_name("salt+pepper") == "salt pepper"
    assert clean_class_name("dog") == "dog"
    assert clean_lvis_name("bow_(weapon)") == "bow weapon"
    assert clean_lvis_name("tennis_racket") == "tennis racket"
    assert clean_lvis_name("Dixie_cup") == "Dixie cup"


def test_expand_templates():
    prompts = expand_templates("hot dog, big+red")
    assert len(prompts) == 81
    assert prompts[:2] == ["hot dog big red.", "a photo of a hot dog big red."]
    assert prompts == [t.format("hot dog big red") for t in TEMPLATES]
    assert expand_templates("a,b", ["x {} y"], clean=False) == ["x a,b y"]
    assert expand_templates("{0}", ["<{}>"]) == ["<{0}>"]  # replace, not format
    with pytest.raises(ValueError, match="placeholder"):
        expand_templates("dog", ["no slot"])
    with pytest.raises(TypeError):
        expand_templates(3)


# ----------------------------------------------------------------------------------------------
# prompt_ensemble_embeddings against NumPy.

_D = 6


def _tables():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(49408, _D)).astype(np.float32)
    pos_w = rng.normal(size=(77,)).astype(np.float32)
    return table, pos_w


def _fake_encoder(table, pos_w, trace_shapes):
    import jax.numpy as jnp

    def encode_text(ids):
        trace_shapes.append(ids.shape)  # runs once per trace (jit) or per call (eager)
        # A position-weighted bag of token embeddings: depends on every token and its position.
        return jnp.einsum("btd,t->bd", jnp.asarray(table)[ids], jnp.asarray(pos_w))

    return encode_text


def _expected(names, templates, table, pos_w, normalize=False):
    rows = []
    for synonyms in names:
        synonyms = [synonyms] if isinstance(synonyms, str) else synonyms
        prompts = [
            t.format(s.replace(",", "").replace("+", " ")) for s in synonyms for t in templates
        ]
        ids = tokenize(prompts)  # verified against open_clip in test_tokenizer.py
        emb = (table[ids].astype(np.float64) * pos_w[None, :, None]).sum(1)
        if normalize:
            emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        m = emb.mean(0)
        rows.append(m / np.linalg.norm(m) if normalize else m)
    return np.stack(rows)


def test_prompt_ensemble_matches_numpy():
    table, pos_w = _tables()
    names = ["dog", "traffic light", "hot dog, frankfurter", "bow weapon", "teddy+bear"]
    shapes = []
    # 5 x 81 = 405 prompts: 6 full batches of 64 and one of 21 (padded).
    out = prompt_ensemble_embeddings(
        _fake_encoder(table, pos_w, shapes), names, batch_size=64, show_progress=True
    )
    assert out.dtype == np.float32 and out.shape == (5, _D)
    np.testing.assert_allclose(out, _expected(names, TEMPLATES, table, pos_w), rtol=1e-4, atol=1e-4)
    # jit compiled one shape only (traced once).
    assert shapes == [(64, 77)]
    # The result is the un-normalised mean (spec §3).
    assert not np.allclose(np.linalg.norm(out, axis=-1), 1.0)


def test_prompt_ensemble_options():
    table, pos_w = _tables()
    templates = ["a {}.", "the {} in a video game.", "{}"]
    names = ["cat", ["car", "automobile"], "bus"]  # a synonym group: mean over 2 x 3 prompts
    shapes = []
    enc = _fake_encoder(table, pos_w, shapes)
    exp = _expected(names, templates, table, pos_w)
    out = prompt_ensemble_embeddings(enc, names, templates=templates, batch_size=4, jit=False)
    np.testing.assert_allclose(out, exp, rtol=1e-4, atol=1e-4)
    # Eager: every call, including the padded last one, sees the fixed batch size.
    assert shapes == [(4, 77)] * 3
    out = prompt_ensemble_embeddings(enc, names, templates=templates, normalize_prompts=True)
    np.testing.assert_allclose(
        out, _expected(names, templates, table, pos_w, normalize=True), rtol=1e-4, atol=1e-4
    )
    # Batch size larger than the prompt count, and exactly the prompt count.
    for bs in (1000, 12):
        got = prompt_ensemble_embeddings(enc, names, templates=templates, batch_size=bs)
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_prompt_ensemble_errors():
    table, pos_w = _tables()
    enc = _fake_encoder(table, pos_w, [])
    with pytest.raises(ValueError, match="empty"):
        prompt_ensemble_embeddings(enc, [])
    with pytest.raises(ValueError, match="empty"):
        prompt_ensemble_embeddings(enc, ["dog"], templates=[])
    with pytest.raises(TypeError, match=r"names\[1\]"):
        prompt_ensemble_embeddings(enc, ["dog", 3])
    with pytest.raises(ValueError, match="batch_size"):
        prompt_ensemble_embeddings(enc, ["dog"], batch_size=0)
    with pytest.raises(ValueError, match="encode_text must return"):
        prompt_ensemble_embeddings(lambda ids: ids[:1].astype(np.float32), ["dog"], jit=False)
