"""Executes notebooks/zero_shot_detection.ipynb in a real IPython kernel (tests/notebook_runner.py)
with the weights and the image served over HTTP by a server on 127.0.0.1 that the test starts.

- Download path: a tiny random-weight CLIP as an OpenAI-named `.safetensors` file and a PNG are
  served; the notebook downloads, checks, converts and caches the file (`hub.download`), downloads
  the image, classifies boxes and detects with a tiny offline RPN. Its results must equal what
  this process computes from the in-memory model the file was written from (so the notebook ran
  on the downloaded weights, not on its random fallback), and it must not print the offline banner.
- Offline fallback: a URL on a closed port -> the loud banner, and every cell still runs on the
  random model.
- A checksum mismatch is not "offline": the download cell fails, no fallback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from helpers import TINY_CLIP
from notebook_runner import cell_outputs, has_image_output, run_notebook
from tiny_rpn import export_random_clip_rpn

from regionclip_jax.convert.state_dict import clip_to_state_dict
from regionclip_jax.inference import RegionCLIP
from regionclip_jax.inference.random_model import random_clip, shapesworld_example
from regionclip_jax.models import CLIPConfig

# Jupyter's kernel machinery is a test dependency of the pinned leg only (.venv).
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow

NOTEBOOK = "zero_shot_detection.ipynb"
VOCABULARY = ["circle", "square", "triangle", "star"]
SIZES = dict(MIN_SIZE=64, MAX_SIZE=96)
SCORE_THRESH = 0.05
BANNER = "OFFLINE: using a tiny RANDOM-weight model, predictions are meaningless"
# The server stops by itself after this many seconds, should the fixture's teardown never run.
SERVER_LIFETIME_S = 300


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Serves a tiny CLIP (`.safetensors`, OpenAI names) and a ShapesWorld PNG on 127.0.0.1;
    yields what the notebook is given and the in-memory model the file was written from."""
    from PIL import Image
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("served")
    files = root / "www"
    files.mkdir()
    clip = random_clip(CLIPConfig(**TINY_CLIP), seed=3)  # not the fallback's weights (seed 0)
    weights = files / "tiny_clip.safetensors"
    save_file(clip_to_state_dict(clip), str(weights))
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    image, boxes, _ = shapesworld_example(3)
    Image.fromarray(image).save(files / "scene.png")
    export_random_clip_rpn(root / "rpn", pre_nms_topk=200, post_nms_topk=50, nms_thresh=0.7)

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(files))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield dict(
            clip=clip,
            weights_url=f"{base}/tiny_clip.safetensors",
            sha256=sha256,
            image=image,
            image_url=f"{base}/scene.png",
            png=files / "scene.png",
            boxes=boxes,
            rpn=root / "rpn" / "export",
        )
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notebook_downloads_weights_and_uses_them(served, tmp_path):
    cache, work = tmp_path / "cache", tmp_path / "work"
    boxes = served["boxes"].tolist()
    nb = run_notebook(
        NOTEBOOK,
        dict(
            WEIGHTS=served["weights_url"],
            WEIGHTS_SHA256=served["sha256"],
            RPN=str(served["rpn"]),
            IMAGE=served["image_url"],
            BOXES=boxes,
            VOCABULARY=VOCABULARY,
            SCORE_THRESH=SCORE_THRESH,
            WORKDIR=str(work),
            CACHE=str(cache),
            **SIZES,
        ),
        tmp_path,
    )
    download = cell_outputs(nb, "download")
    assert "OFFLINE" not in download and "RANDOM" not in download
    # The converted checkpoint sits in CACHE, recorded as the file with the served digest.
    (checkpoint,) = [p.parent for p in (cache / "checkpoints").glob("*/model.json")]
    assert json.loads((checkpoint / "download.json").read_text())["sha256"] == served["sha256"]
    assert f"checkpoint: {checkpoint.resolve()}" in download
    # The image the notebook downloaded is the served PNG.
    assert (work / "images" / "scene.png").read_bytes() == served["png"].read_bytes()
    assert "RPN: clip" in cell_outputs(nb, "model")

    # The reference: the in-memory model the served file was written from, same inputs.
    reference = RegionCLIP(served["clip"], rpn=served["rpn"], cache_dir=None, **_sizes())
    want = reference.classify_regions(served["image"], served["boxes"], VOCABULARY)
    regions = json.loads((work / "regions.json").read_text())
    assert regions["classes"] == VOCABULARY
    assert len(regions["regions"]) == len(boxes)
    got = np.array([[r["probs"][w] for w in VOCABULARY] for r in regions["regions"]])
    assert got.shape == want.probs.shape == (len(boxes), len(VOCABULARY))
    assert f"probs ({len(boxes)}, {len(VOCABULARY)})" in cell_outputs(nb, "classify")
    np.testing.assert_allclose(got, want.probs, atol=1e-5)
    np.testing.assert_allclose(
        [r["background"] for r in regions["regions"]], want.background, atol=1e-5
    )

    # Detection with the RPN's proposals, as the transformers pipeline's list.
    dets = json.loads((work / "detections.json").read_text())
    want_dets = reference.detect(served["image"], VOCABULARY, score_thresh=SCORE_THRESH)
    assert len(want_dets) > 0 and len(dets) == len(want_dets)
    for d, score, label, box in zip(dets, want_dets.scores, want_dets.labels, want_dets.boxes):
        assert set(d) == {"score", "label", "box"}
        assert set(d["box"]) == {"xmin", "ymin", "xmax", "ymax"}
        assert d["label"] == VOCABULARY[int(label)]
        assert d["score"] == pytest.approx(float(score), abs=1e-5)
        assert [d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == [
            int(v) for v in np.floor(box)
        ]
    assert has_image_output(nb)
    assert (work / "detections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "'like box 0'" in cell_outputs(nb, "exemplar")


def _sizes() -> dict:
    return dict(min_size=SIZES["MIN_SIZE"], max_size=SIZES["MAX_SIZE"])


def test_notebook_falls_back_to_random_weights_offline(tmp_path):
    work = tmp_path / "work"
    nb = run_notebook(
        NOTEBOOK,
        dict(
            WEIGHTS=f"http://127.0.0.1:{_closed_port()}/x.safetensors",
            WEIGHTS_SHA256="0" * 64,
            WORKDIR=str(work),
            CACHE=str(tmp_path / "cache"),
            **SIZES,
        ),
        tmp_path,
    )
    download = cell_outputs(nb, "download")
    assert "OFFLINE: could not download" in download and BANNER in download
    assert (work / "random_clip" / "model.json").is_file()
    # Every later cell ran, on the ShapesWorld example and the default vocabulary.
    _, boxes, _ = shapesworld_example(0)
    regions = json.loads((work / "regions.json").read_text())
    assert len(regions["regions"]) == len(boxes)
    assert has_image_output(nb)
    assert "'like box 0'" in cell_outputs(nb, "exemplar")


def test_notebook_checksum_mismatch_does_not_fall_back(served, tmp_path):
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="checksum mismatch"):
        run_notebook(
            NOTEBOOK,
            dict(
                WEIGHTS=served["weights_url"],
                WEIGHTS_SHA256="0" * 64,
                WORKDIR=str(tmp_path / "work"),
                CACHE=str(tmp_path / "cache"),
            ),
            tmp_path,
        )
    assert not (tmp_path / "work" / "random_clip").exists()
