"""CLIP tokenizer: equality with open_clip on generated text, truncation modes, API contracts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from regionclip_jax.text import tokenizer as tok_mod
from regionclip_jax.text.tokenizer import EOT_ID, SOT_ID, Tokenizer, clean_text, tokenize

# ----------------------------------------------------------------------------------------------
# Deterministic generator of varied strings.

# fmt: off
_WORDS = [
    "a", "photo", "of", "the", "Dog", "CAT", "traffic", "light", "hot-dog", "teddy", "bear",
    "skateboard", "giraffe", "naïve", "café", "résumé", "Straße", "Ærøskøbing", "Ελλάδα", "ΟΔΟΣ",
    "москва", "Привет", "東京", "北京烤鸭", "こんにちは", "한국어", "مرحبا", "שלום", "हिन्दी", "ไทย",
    "😀", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧", "❤️", "∑x²", "½", "№5", "ﬁsh", "１２３", "Ｈｅｌｌｏ",
    "İstanbul", "don't", "it's", "we're", "I've", "I'm", "you'll", "he'd", "IT'S", "rock'n'roll",
    "o'clock", "3.14159", "2024-01-01", "100%", "$9.99", "#hashtag", "@user", "e-mail", "U.S.A.",
    "C++", "x86_64", "snake_case", "CamelCaseWord", "hello!!!", "why??", "...", "—", "–",
    "«quote»", "“smart”", "‘single’", "(paren)", "[bracket]", "{brace}", "<tag>", "a/b", "a\\b",
    "~tilde",
]
_ENTITIES = [
    "&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&amp;amp;", "&amp;lt;b&amp;gt;", "&nbsp;",
    "&eacute;", "&#x27;", "&#8217;", "&copy;", "&hellip;", "&amp;quot;", "&notanentity;",
]
_SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\r\n", "\u00a0", "\u2003", "\u3000", "   "]
_COMBINING = ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "Z\u0336"]
# Text that was UTF-8 but decoded as windows-1252 / latin-1: ftfy repairs it.
_MOJIBAKE_SRC = ["café", "naïve", "résumé", "“quoted”", "it’s", "Straße", "Ünïcödé", "—dash"]
# fmt: on


def _mojibake(s: str) -> str:
    return s.encode("utf-8").decode("windows-1252", errors="replace")


def _random_text(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 10)
    pieces = []
    n = int(rng.integers(1, 12)) if kind != 9 else int(rng.integers(40, 90))  # kind 9: long
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            w = _WORDS[rng.integers(len(_WORDS))]
            case = rng.integers(0, 4)
            w = w.upper() if case == 0 else w.title() if case == 1 else w
        elif r < 0.67:
            w = _ENTITIES[rng.integers(len(_ENTITIES))]
        elif r < 0.75:
            w = _COMBINING[rng.integers(len(_COMBINING))]
        elif r < 0.83:
            w = _mojibake(_MOJIBAKE_SRC[rng.integers(len(_MOJIBAKE_SRC))])
        elif r < 0.91:
            w = str(int(rng.integers(0, 10**6)))
        else:
            # Random code points from a few blocks (Latin-1, Greek, Cyrillic, CJK, emoji).
            lo, hi = [(0x21, 0x7F), (0xA1, 0x180), (0x370, 0x3FF), (0x400, 0x4FF),
                      (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)][rng.integers(6)]  # fmt: skip
            w = "".join(chr(int(c)) for c in rng.integers(lo, hi, size=rng.integers(1, 5)))
        pieces.append(w)
        pieces.append(_SPACES[rng.integers(len(_SPACES))] if rng.random() < 0.3 else " ")
    text = "".join(pieces)
    if kind == 8:
        text = _SPACES[rng.integers(len(_SPACES))] + text + _SPACES[rng.integers(len(_SPACES))]
    return text


def _corpus(n: int = 1100) -> list[str]:
    rng = np.random.default_rng(0)
    texts = [_random_text(rng) for _ in range(n)]
    texts += ["", " ", "\t\n ", "\u3000", "&amp;", "&amp;amp;amp;", "cafÃ©", "Ã©tÃ©", "a" * 500]
    texts += ["word " * 200, "supercalifragilisticexpialidocious " * 30, "😀" * 100]
    return texts


# ----------------------------------------------------------------------------------------------
# Against open_clip.


@pytest.mark.torch_ref
def test_matches_open_clip_on_generated_text():
    open_clip = pytest.importorskip("open_clip")
    texts = _corpus()
    ours = tokenize(texts)
    ref = open_clip.tokenize(texts).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, [(texts[i], ours[i][:10], ref[i][:10]) for i in bad[:3]]
    # The corpus really exercises truncation, empties and non-ASCII.
    n_long = int(((ref != 0).sum(1) == 77).sum())
    assert n_long >= 50
    assert int(((ref != 0).sum(1) == 2).sum()) >= 4
    # get_tokenizer('RN50') is open_clip's per-model entry point; same tokenizer.
    assert np.array_equal(open_clip.get_tokenizer("RN50")(texts[:200]).numpy(), ours[:200])


@pytest.mark.torch_ref
def test_matches_open_clip_short_context():
    open_clip = pytest.importorskip("open_clip")
    texts = _corpus(300)
    for ctx in (2, 8, 33):
        np.testing.assert_array_equal(
            tokenize(texts, context_length=ctx), open_clip.tokenize(texts, context_length=ctx)
        )


@pytest.mark.torch_ref
def test_encode_matches_simple_tokenizer_encode():
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    tok = Tokenizer()
    for text in _corpus(400):
        assert tok.encode(text) == ref.encode(text), text


@pytest.mark.torch_ref
def test_regionclip_truncation_vs_reference():
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    ref_tok = SimpleTokenizer()
    texts = _corpus(500)

    def reference(text, ctx):
        # RegionCLIP convert_example_to_features_bpe: [SOT] + ids + [EOT], cut to ctx, no EOT.
        ids = ([SOT_ID] + ref_tok.encode(text) + [EOT_ID])[:ctx]
        row = np.zeros(ctx, np.int64)
        row[: len(ids)] = ids
        return row

    n_tokens = np.array([len(ref_tok.encode(t)) + 2 for t in texts])

    for ctx in (77, 20):
        ours = tokenize(texts, context_length=ctx, truncate="regionclip")
        expected = np.stack([reference(t, ctx) for t in texts])
        np.testing.assert_array_equal(ours, expected)
        long = n_tokens > ctx
        assert long.sum() >= 20
        # Truncated rows: no EOT at all (the quirk), and they differ from "clip" only in the
        # last slot.
        assert not (ours[long] == EOT_ID).any()
        clip = tokenize(texts, context_length=ctx, truncate="clip")
        np.testing.assert_array_equal(clip[long, :-1], ours[long, :-1])
        np.testing.assert_array_equal(clip[~long], ours[~long])


# ----------------------------------------------------------------------------------------------
# No torch needed.


def test_batch_equals_single():
    texts = _corpus(150)
    batch = tokenize(texts)
    single = np.concatenate([tokenize(t) for t in texts])
    np.testing.assert_array_equal(batch, single)
    np.testing.assert_array_equal(Tokenizer()(texts), batch)


def test_shapes_dtype_and_special_tokens():
    out = tokenize(["a photo of a dog.", "", "   \n\t", "x " * 200])
    assert out.shape == (4, 77) and out.dtype == np.int32
    assert (out[:, 0] == SOT_ID).all()
    # Every row has exactly one EOT, and only zeros after it.
    for row in out:
        (eot,) = np.flatnonzero(row == EOT_ID)
        assert (row[eot + 1 :] == 0).all()
        assert (row[1:eot] != 0).all() or eot == 1
    np.testing.assert_array_equal(out[1], out[2])
    assert out[1, 1] == EOT_ID and (out[1, 2:] == 0).all()
    assert out[3, -1] == EOT_ID  # truncated, EOT in the last slot
    assert tokenize("a dog").shape == (1, 77)
    assert tokenize([]).shape == (0, 77)
    assert tokenize(np.array(["a", "b"])).shape == (2, 77)
    assert tokenize(["a"], context_length=5).shape == (1, 5)
    # Pooling at argmax(ids) finds EOT for every "clip" row.
    assert (out[np.arange(4), out.argmax(1)] == EOT_ID).all()


def test_cleaning():
    # Spec §3: ftfy, double html unescape, whitespace collapse, lower-case.
    assert clean_text("  A &amp;amp; B\t\n C  ") == "a & b c"
    assert clean_text("&lt;b&gt; &#39;x&#39; &quot;y&quot;") == "<b> 'x' \"y\""
    assert clean_text("cafÃ©") == "café"
    assert clean_text("\u3000") == ""
    t = Tokenizer()
    assert t.encode("Dog") == t.encode("dog") == t.encode("  DOG ")
    assert t.encode("&amp;") == t.encode("&")
    assert t.encode("") == []
    assert SOT_ID not in t.encode("a b") and EOT_ID not in t.encode("a b")


def test_decode_round_trip():
    t = Tokenizer()
    for text in ["a photo of a dog", "the quick brown fox jumps over the lazy dog", "東京 café"]:
        assert t.decode(t.encode(text)) == text
        assert t.decode(tokenize(text)[0]) == text
    assert t.decode(tokenize("")[0]) == ""
    with pytest.raises(ValueError, match="out of range"):
        t.decode([50000])


def test_truncate_error_names_text():
    texts = ["short", "word " * 100]
    with pytest.raises(ValueError, match=r"texts\[1\] \('word word word") as e:
        tokenize(texts, truncate="error")
    # The first 40 characters, not the whole text.
    assert repr(texts[1][:40]) in str(e.value) and "word " * 9 not in str(e.value)
    # Exactly context_length tokens fit; one more does not.
    n_words = 75  # 'word' is one token: 75 + SOT + EOT = 77
    assert tokenize("word " * n_words, truncate="error")[0, -1] == EOT_ID
    with pytest.raises(ValueError):
        tokenize("word " * (n_words + 1), truncate="error")


def test_argument_errors():
    with pytest.raises(TypeError, match=r"texts\[2\] must be a str, got int"):
        tokenize(["a", "b", 3])
    with pytest.raises(TypeError, match=r"texts\[0\].*NoneType"):
        tokenize([None])
    with pytest.raises(TypeError):
        tokenize(b"bytes")
    with pytest.raises(TypeError):
        tokenize(42)
    with pytest.raises(TypeError):
        Tokenizer().encode(1)
    with pytest.raises(ValueError, match="truncate"):
        tokenize("a", truncate="left")
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=1)


def test_tokenizer_pickles_and_backend_is_shared():
    t = Tokenizer(context_length=16, truncate="regionclip")
    t2 = pickle.loads(pickle.dumps(t))
    assert (t2.context_length, t2.truncate) == (16, "regionclip")
    np.testing.assert_array_equal(t2("word " * 40), t("word " * 40))
    assert t2("word " * 40).shape == (1, 16) and t2("word " * 40)[0, -1] != EOT_ID
    assert tok_mod._backend() is tok_mod._backend()


def test_top_level_lazy_tokenize():
    import regionclip_jax

    np.testing.assert_array_equal(regionclip_jax.tokenize(["a dog"]), tokenize(["a dog"]))
