"""Zero-shot recognition (`regionclip_jax.inference`) against independent references.

References: torchvision's `Resize(max_size=)` + PIL bicubic for preprocessing, open_clip's tiny
random CLIP (text prompt ensemble with open_clip's tokenizer, RoI features with its ResNet modules
+ torchvision RoIAlign) for probabilities, torchvision `batched_nms` for post-processing, and the
closed-form background probability of spec §3. Tiny models and small canvases keep this fast.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from PIL import Image
from torch_reference import open_clip_model

from regionclip_jax.eval.postprocess import detections_numpy
from regionclip_jax.inference import RegionCLIP
from regionclip_jax.inference.preprocess import (
    bucket_size,
    default_canvas,
    preprocess,
    validate_boxes,
)
from regionclip_jax.inference.vocabulary import parse_vocabulary
from regionclip_jax.text.templates import TEMPLATES

TEXT = dict(width=64, heads=1, layers=1, vocab_size=49408)
VISION = dict(layers=[1, 1, 1, 1], width=16, image_size=64)
EMBED = 32
SIZES = dict(min_size=64, max_size=96)  # canvas buckets 64 x 96 / 96 x 64
WORDS = ["cat", "dog", "red car"]
BOXES = [[2, 3, 60, 50], [0, 0, 120, 90], [70.5, 40.2, 72.0, 44.0], [30, 10, 119, 89]]


def torch_clip(seed: int = 0):
    import torch  # optional: the fixtures skip without open_clip

    model = open_clip_model(EMBED, VISION, TEXT, seed)
    with torch.no_grad():
        # Shrink the visual output so cosines differ by a few 0.01s, not by saturating amounts.
        model.visual.attnpool.c_proj.weight.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("open_clip")
    from regionclip_jax.convert.checkpoint import save_clip
    from regionclip_jax.convert.state_dict import clip_from_state_dict, infer_config

    tm = torch_clip()
    tmp = tmp_path_factory.mktemp("inference")
    config = infer_config(tm.state_dict(), transformer_heads=1)
    ckpt = save_clip(clip_from_state_dict(tm.state_dict(), config=config), tmp / "ckpt")
    rng = np.random.RandomState(0)
    image = (rng.rand(90, 120, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp / "img.png")
    return tm, ckpt, tmp


@pytest.fixture(scope="module")
def model(setup):
    _, ckpt, tmp = setup
    return RegionCLIP.from_checkpoint(ckpt, cache_dir=tmp / "cache", **SIZES)


def reference_canvas(path, min_size=64, max_size=96):
    """torchvision Resize(min_size, max_size=..., bicubic) on the PIL image, CLIP-normalised."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    im = Image.open(path).convert("RGB")
    r = TF.resize(im, min_size, interpolation=InterpolationMode.BICUBIC, max_size=max_size)
    x = np.asarray(r, np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    return (x - mean) / std, (im.height, im.width)


def zero_pad(x, hw):
    """Bottom/right zero padding after normalisation (detectron2 ImageList)."""
    out = np.zeros(hw + x.shape[2:], x.dtype)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def torch_probs(tm, canvas_image, boxes, words):
    """Softmax over [cos/0.01 ..., 0] of open_clip features (81-template mean text embeddings)."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from torchvision.ops import roi_align

    tok = open_clip.get_tokenizer("RN50")
    v = tm.visual
    with torch.no_grad():
        emb = torch.stack(
            [tm.encode_text(tok([t.format(w) for t in TEMPLATES])).mean(0) for w in words]
        )
        x = torch.from_numpy(canvas_image[None]).permute(0, 3, 1, 2).contiguous()
        res4 = v.layer3(v.layer2(v.layer1(v.stem(x))))
        rois = torch.from_numpy(np.concatenate([np.zeros((len(boxes), 1)), boxes], 1)).float()
        feats = v.attnpool(v.layer4(roi_align(res4, rois, 4, 1 / 16, 0, True)))
        cos = F.normalize(feats, dim=-1) @ F.normalize(emb, dim=-1).T
        logits = torch.cat([cos / 0.01, torch.zeros(len(cos), 1)], 1)
    return torch.softmax(logits, -1).numpy(), feats.numpy(), emb.numpy()


# -------------------------------------------------------------------------------- preprocessing


@pytest.mark.torch_ref
def test_preprocess_matches_torchvision_resize(setup):
    _, _, tmp = setup
    prepared = preprocess(tmp / "img.png", **SIZES)
    ref, hw = reference_canvas(tmp / "img.png")
    assert prepared.original_hw == hw == (90, 120)
    assert prepared.image_hw == ref.shape[:2] == (64, 85)
    assert prepared.image.shape == (64, 96, 3) == default_canvas(64, 85, 64, 96) + (3,)
    np.testing.assert_allclose(prepared.image[:64, :85], ref, atol=1e-5)
    np.testing.assert_array_equal(prepared.image[:, 85:], 0.0)
    b = np.array(BOXES, np.float32)
    np.testing.assert_allclose(prepared.to_original(prepared.to_canvas(b)), b, rtol=1e-6)
    np.testing.assert_allclose(prepared.to_canvas(b)[1], [0, 0, 85, 64], rtol=1e-6)
    assert default_canvas(1333, 800, 800, 1333) == (1344, 800)
    assert bucket_size(1) == 8 and bucket_size(9) == 16 and bucket_size(1000) == 1024


# ---------------------------------------------------------------------------------- recognition


@pytest.mark.torch_ref
def test_classify_regions_matches_torch_reference(setup, model):
    tm, _, tmp = setup
    scores = model.classify_regions(tmp / "img.png", BOXES, WORDS)
    ref_canvas, _ = reference_canvas(tmp / "img.png")
    prepared = preprocess(tmp / "img.png", **SIZES)
    ref, ref_feats, ref_emb = torch_probs(
        tm, zero_pad(ref_canvas, (64, 96)), prepared.to_canvas(np.array(BOXES, np.float32)), WORDS
    )
    assert scores.names == WORDS
    assert scores.probs.shape == (4, 3)
    np.testing.assert_allclose(scores.probs, ref[:, :3], atol=2e-4)
    np.testing.assert_allclose(scores.background, ref[:, 3], atol=2e-4)
    # Background probability = 1 / (1 + sum_k exp(cos_k / 0.01)) (spec §3).
    _, emb = model.text_embeddings(WORDS)
    np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-5 * np.abs(ref_emb).max())
    feats = model.region_features(prepared.image[None], prepared.to_canvas(np.array(BOXES))[None])
    np.testing.assert_allclose(feats[0], ref_feats, atol=1e-4 * np.abs(ref_feats).max())
    f = feats[0] / np.linalg.norm(feats[0], axis=-1, keepdims=True)
    e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    bg = 1.0 / (1.0 + np.exp((f @ e.T).astype(np.float64) / 0.01).sum(-1))
    np.testing.assert_allclose(scores.background, bg, atol=1e-4)


def test_region_features_batched_and_bucketed(model, setup):
    _, _, tmp = setup
    p = preprocess(tmp / "img.png", **SIZES)
    boxes = p.to_canvas(np.array(BOXES, np.float32))
    single = model.region_features(p.image[None], boxes[None])
    assert single.shape == (1, 4, EMBED)
    # Two images of a batch, 3 and 4 real boxes: the padded bucket does not change any row.
    imgs = np.stack([p.image, p.image[:, ::-1].copy()])
    both = model.region_features(imgs, np.stack([boxes, boxes]))
    np.testing.assert_allclose(both[0], single[0], rtol=1e-5, atol=1e-5)
    first3 = model.region_features(p.image[None], boxes[None, :3])
    np.testing.assert_allclose(first3[0], single[0, :3], rtol=1e-5, atol=1e-5)


def test_text_embeddings_are_cached(model, monkeypatch):
    import regionclip_jax.text.embeddings as emb_mod

    words, first = model.text_embeddings("cat, dog")
    files = list(model.cache.directory.glob("*.npy"))
    assert words == ["cat", "dog"] and files

    def fail(*a, **k):
        raise AssertionError("recomputed a cached vocabulary")

    monkeypatch.setattr(emb_mod, "prompt_ensemble_embeddings", fail)
    _, again = model.text_embeddings(["cat", "dog"])
    np.testing.assert_array_equal(again, first)
    with pytest.raises(AssertionError, match="recomputed"):
        model.text_embeddings(["dog", "cat"])  # order matters: a new key


@pytest.mark.torch_ref
def test_detections_numpy_matches_torchvision_batched_nms():
    import torch
    from torchvision.ops import batched_nms

    rng = np.random.RandomState(0)
    r, k = 40, 5
    xy = rng.uniform(0, 80, (r, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (r, 2))], 1).astype(np.float32)
    probs = rng.dirichlet(np.ones(k + 1), r)[:, :k].astype(np.float32)
    out_b, out_s, out_k = detections_numpy(
        probs, boxes, (200, 200), score_thresh=0.05, nms_thresh=0.5, max_detections=30
    )
    ri, ki = np.nonzero(probs > 0.05)
    keep = batched_nms(
        torch.from_numpy(boxes[ri]), torch.from_numpy(probs[ri, ki]), torch.from_numpy(ki), 0.5
    ).numpy()[:30]
    np.testing.assert_allclose(out_s, probs[ri, ki][keep])
    np.testing.assert_array_equal(out_k, ki[keep])
    np.testing.assert_allclose(out_b, boxes[ri[keep]])


def test_detect_gt_mode_and_proposal_error(model, setup):
    _, _, tmp = setup
    dets = model.detect(tmp / "img.png", WORDS, boxes=BOXES, score_thresh=0.0, max_detections=5)
    assert 1 <= len(dets) <= 5
    assert np.all(np.diff(dets.scores) <= 0)
    # Boxes come back in original pixels (each is one of the inputs).
    for b in dets.boxes:
        assert np.abs(np.array(BOXES, np.float32) - b).sum(-1).min() < 1e-3
    d = dets.to_dict()
    assert set(d) == {"classes", "detections"} and d["classes"] == WORDS
    with pytest.raises(ValueError, match="needs an offline RPN"):
        model.detect(tmp / "img.png", WORDS)


def test_exemplar_query(model, setup):
    _, _, tmp = setup
    query = model.exemplar_embedding(tmp / "img.png", [BOXES[0]])
    assert query.shape == (EMBED,)
    # The same box against its own exemplar: cosine 1 -> logit 100 vs background 0.
    s = model.classify_regions(tmp / "img.png", [BOXES[0]], None, exemplars={"thing": query})
    assert s.names == ["thing"]
    np.testing.assert_allclose(s.probs[0, 0], 1.0 / (1.0 + np.exp(-100.0)), rtol=1e-5)
    # Mixed with words: exemplar queries come after the vocabulary.
    s = model.classify_regions(tmp / "img.png", BOXES, WORDS, exemplars={"thing": query})
    assert s.names == WORDS + ["thing"] and s.labels[0] == 3


def test_bad_inputs(model, setup):
    _, _, tmp = setup
    bad = tmp / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        model.classify_regions(bad, BOXES, WORDS)
    with pytest.raises(FileNotFoundError):
        model.classify_regions(tmp / "missing.png", BOXES, WORDS)
    with pytest.raises(ValueError, match="box 1 .* outside"):
        model.classify_regions(tmp / "img.png", [[0, 0, 5, 5], [10, 10, 130, 20]], WORDS)
    with pytest.raises(ValueError, match="box 0 .* degenerate"):
        model.classify_regions(tmp / "img.png", [[10, 10, 10, 20]], WORDS)
    with pytest.raises(ValueError, match="non-finite"):
        validate_boxes([[0, 0, np.nan, 3]], (10, 10))
    with pytest.raises(ValueError, match=r"\[R, 4\]"):
        validate_boxes([1, 2, 3], (10, 10))
    clipped = validate_boxes([[-3, 2, 130, 20]], (90, 120), clip=True)
    np.testing.assert_array_equal(clipped, [[0, 2, 120, 20]])
    with pytest.raises(ValueError, match="empty"):
        model.classify_regions(tmp / "img.png", BOXES, [])
    with pytest.raises(ValueError, match="empty"):
        parse_vocabulary(" , ,")
    with pytest.raises(
        ValueError, match=r"duplicate classes: 'cat' \(item 1\) and 'cat' \(item 3\)"
    ):
        model.classify_regions(tmp / "img.png", BOXES, ["cat", "dog", "cat"])
    words = tmp / "words.txt"
    words.write_text("# animals\ncat\n\ndog\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_vocabulary(str(words)) == ["cat", "dog"]
    # A path-like string that is no file is an error naming it, not a one-class vocabulary.
    for missing in (str(tmp / "wrods.txt"), "wrods.txt", "vocab/words"):
        with pytest.raises(
            FileNotFoundError, match=f"vocabulary file {re.escape(missing)} not found"
        ):
            parse_vocabulary(missing)
    assert parse_vocabulary("dog.png,") == ["dog.png"]  # the documented way to mean the word
    assert parse_vocabulary(["vocab/words"]) == ["vocab/words"]
    assert parse_vocabulary("st. bernard") == ["st. bernard"]  # words with dots stay words
    assert parse_vocabulary("cat") == ["cat"]


def test_vocabulary_duplicates_after_tokenizer_cleaning_are_an_error(tmp_path):
    """Names the tokenizer cleans to the same text embed identically: one error naming both."""
    from regionclip_jax.text.tokenizer import clean_text

    assert clean_text("Hot  Dog ") == clean_text("hot dog")
    with pytest.raises(ValueError, match=r"'Hot  Dog' \(item 2\) and 'hot dog' \(item 3\)"):
        parse_vocabulary(["cat", "Hot  Dog", "hot dog"])
    with pytest.raises(ValueError, match=r"'fish &amp; chips' \(item 1\) and 'Fish & chips'"):
        parse_vocabulary("fish &amp; chips, Fish & chips")
    words = tmp_path / "words.txt"
    words.write_text("# animals\ncat\ndog\n\nCAT\n")
    with pytest.raises(
        ValueError,
        match=rf"vocabulary file {re.escape(str(words))}: duplicate classes: 'cat' \(line 2\) "
        r"and 'CAT' \(line 5\)",
    ):
        parse_vocabulary(str(words))
    assert parse_vocabulary("cat,dog,hot dog") == ["cat", "dog", "hot dog"]


def test_vocabulary_file_not_utf8_names_file_and_line(tmp_path):
    words = tmp_path / "words.txt"
    words.write_bytes(b"cat\ndog\ncaf\xe9 au lait\n")
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(words))}:3: vocabulary file is not UTF-8 text \(byte 0xe9 at "
        r"column 4\)",
    ):
        parse_vocabulary(str(words))


def test_detections_masks_in_json_and_picture():
    from pycocotools import mask as mask_utils

    from regionclip_jax.inference.recognizer import Detections
    from regionclip_jax.inference.visualize import draw_boxes, draw_detections

    h, w = 60, 80
    boxes = np.array([[2, 3, 30, 50], [40, 4, 78, 56]], np.float32)
    args = (boxes, np.array([0.9, 0.4], np.float32), np.array([0, 1], np.int32), ["a", "b"])
    plain = Detections(*args)
    assert all("mask" not in d for d in plain.to_dict()["detections"])  # unchanged without masks
    bm = np.zeros((2, h, w), np.uint8)
    bm[0, 30:45, 5:25] = 1
    bm[1, 30:50, 45:70] = 1
    rles = [
        {"size": [h, w], "counts": r["counts"].decode()}
        for r in mask_utils.encode(np.asfortranarray(bm.transpose(1, 2, 0)))
    ]
    with_masks = Detections(*args, masks=rles)
    got = [d["mask"] for d in with_masks.to_dict()["detections"]]
    assert [mask_utils.decode(m).astype(bool).sum() for m in got] == [300, 500]
    assert with_masks.to_json()  # JSON-serialisable
    image = np.full((h, w, 3), 100, np.uint8)
    pic = np.asarray(draw_detections(image, with_masks))
    ref = np.asarray(draw_boxes(image, boxes, ["a", "b"], args[1], class_ids=[0, 1]))
    # Inside mask 0 (away from box outline and caption) the colour is blended 45% towards blue.
    np.testing.assert_array_equal(
        pic[40, 10], np.round(0.55 * 100 + 0.45 * np.array([31, 119, 180]))
    )
    assert not np.array_equal(pic[40, 55], ref[40, 55])  # mask 1
    np.testing.assert_array_equal(pic[58, 35], ref[58, 35])  # outside every mask and box
    bools = np.asarray(
        draw_boxes(image, boxes, ["a", "b"], args[1], class_ids=[0, 1], masks=bm.astype(bool))
    )
    np.testing.assert_array_equal(bools, pic)
