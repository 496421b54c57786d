"""`regionclip-jax download` / `convert.hub`: weights by name, downloaded on request, verified,
converted once and cached.

Every download here comes from an HTTP server started on 127.0.0.1 by the `server` fixture
(http.server in a thread: Range support, and modes that cut the connection after K bytes, ignore
Range and answer 200, or answer 404); the registry's entries are monkeypatched to point at it.
The files served are tiny random models in real formats: an OpenAI-style TorchScript archive of an
open_clip model (leg 1, torch_ref) and a safetensors file of a CLIP state dict (both legs). A
download is checked against converting the same file by hand with `regionclip-jax convert` /
`convert-regionclip`, and the cached file against the served bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_CLIP
from test_convert_files import _tiny_open_clip, _torchscript_like_openai
from test_rpn import detectron2_state_dict

from regionclip_jax import cli
from regionclip_jax.convert import hub

# ---------------------------------------------------------------------------------------------
# the local server


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        state = self.server.state
        rng = self.headers.get("Range")
        state["requests"].append({"path": self.path, "range": rng})
        data = state["files"].get(self.path)
        if state["mode"] == "404" or data is None:
            self.send_error(404)
            return
        start = 0
        if rng and state["mode"] != "ignore_range":
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if state["mode"] == "cut":
            # Announce the whole body, send K bytes, close: a connection cut mid-file.
            self.wfile.write(body[: state["cut_after"]])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server:
    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 10
        self.httpd.state = {"files": {}, "mode": "normal", "cut_after": 0, "requests": []}
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        # Bounded: the server stops by itself even if a test hangs.
        self.stopper = threading.Timer(120, self.httpd.shutdown)
        self.stopper.daemon = True
        self.thread.start()
        self.stopper.start()

    @property
    def state(self):
        return self.httpd.state

    @property
    def requests(self):
        return self.state["requests"]

    def serve(self, name: str, data: bytes) -> tuple[str, str]:
        """Serves `data` at an OpenAI-style URL (the digest in the path); returns (url, sha256)."""
        sha = hashlib.sha256(data).hexdigest()
        path = f"/clip/models/{sha}/{name}"
        self.state["files"][path] = data
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}", sha

    def close(self):
        self.stopper.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = Server()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# files in the real formats, and the reference conversions


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """{format: path} of one tiny random CLIP: "safetensors" (both legs) and "torchscript" (an
    OpenAI-style .pt, only with torch); formats that cannot be written here are absent."""
    from regionclip_jax.convert.state_dict import clip_to_state_dict
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models.presets import CLIPConfig

    d = tmp_path_factory.mktemp("clip_files")
    files = {}
    try:
        from safetensors.numpy import save_file
    except ImportError:
        save_file = None
    sd = clip_to_state_dict(random_clip(CLIPConfig(**TINY_CLIP), seed=3))
    if save_file is not None:
        save_file({k: np.array(v, order="C") for k, v in sd.items()}, str(d / "tiny.safetensors"))
        files["safetensors"] = d / "tiny.safetensors"
    np.savez(d / "tiny.npz", **sd)
    files["npz"] = d / "tiny.npz"
    try:
        import open_clip  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return files
    _torchscript_like_openai(_tiny_open_clip(), d / "tiny.pt")
    files["torchscript"] = d / "tiny.pt"
    return files


@pytest.fixture(scope="module")
def by_hand(clip_files, tmp_path_factory):
    """`by_hand(fmt)`: the checkpoint `regionclip-jax convert --input FILE --output DIR` writes
    (converted once per format)."""
    done = {}

    def convert(fmt: str) -> Path:
        if fmt not in done:
            out = tmp_path_factory.mktemp("by_hand") / fmt
            assert cli.main(["convert", "--input", str(clip_files[fmt]), "--output", str(out)]) == 0
            done[fmt] = out
        return done[fmt]

    return convert


def _file(clip_files, fmt: str) -> Path:
    if fmt not in clip_files:
        pytest.skip(f"no {fmt} file here (safetensors not importable in this venv)")
    return clip_files[fmt]


def _suffix(fmt: str) -> str:
    return {"torchscript": ".pt", "safetensors": ".safetensors", "npz": ".npz"}[fmt]


def _register(monkeypatch, server, clip_files, fmt: str, name: str = "RN50", sha=None):
    """Points the registry entry `name` at the served file; returns (data, url, sha256)."""
    data = _file(clip_files, fmt).read_bytes()
    url, real_sha = server.serve(name + _suffix(fmt), data)
    w = hub.Weights(name, url, sha or real_sha, "openai-clip")
    monkeypatch.setitem(hub.MODELS, name, w)
    return data, url, real_sha


def _arrays(directory: Path) -> dict[str, np.ndarray]:
    from regionclip_jax.convert.checkpoint import load_clip

    state = nnx.to_pure_dict(nnx.state(load_clip(directory)))
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(state)
    }


def _assert_same_checkpoint(got: Path, want: Path) -> None:
    meta_got = json.loads((got / "model.json").read_text())
    meta_want = json.loads((want / "model.json").read_text())
    for key in ("config", "preset", "param_count", "model_type"):
        assert meta_got[key] == meta_want[key], key
    assert meta_got["source"]["sha256"] == meta_want["source"]["sha256"]
    a, b = _arrays(got), _arrays(want)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _no_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "convert_clip_file", fail)


# ---------------------------------------------------------------------------------------------
# 1 + 4: download == convert by hand; the second call touches neither network nor converter


@pytest.mark.parametrize(
    "fmt", [pytest.param("torchscript", marks=pytest.mark.torch_ref), "safetensors"]
)
def test_download_equals_convert_by_hand_then_cache(
    fmt, server, clip_files, by_hand, tmp_path, monkeypatch, capsys
):
    data, _, sha = _register(monkeypatch, server, clip_files, fmt)
    cache, out = tmp_path / "cache", tmp_path / "ckpt" / "rn50"
    argv = ["download", "RN50", "--output", str(out), "--cache", str(cache), "--quiet"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out.resolve())
    _assert_same_checkpoint(out, by_hand(fmt))
    assert json.loads((out / "model.json").read_text())["source"]["sha256"] == sha
    assert (cache / "downloads" / f"RN50{_suffix(fmt)}").read_bytes() == data
    _assert_same_checkpoint(cache / "checkpoints" / "RN50", by_hand(fmt))
    assert len(server.requests) == 1

    _no_conversion(monkeypatch)
    capsys.readouterr()
    assert cli.main(["download", "openai:RN50", "--cache", str(cache), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str((cache / "checkpoints" / "RN50").resolve())
    out2 = tmp_path / "second"
    assert cli.main(["download", "RN50", "-o", str(out2), "--cache", str(cache), "-q"]) == 0
    _assert_same_checkpoint(out2, by_hand(fmt))
    assert len(server.requests) == 1  # no request reached the server

    # An existing output needs --overwrite; nothing is fetched before that check.
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    assert len(server.requests) == 1


def test_torch_is_checked_before_downloading(server, clip_files, tmp_path, monkeypatch):
    # A .pt needs PyTorch to be read: without it, nothing may be downloaded.
    url, _ = server.serve("RN50.pt", b"not fetched")
    monkeypatch.setitem(hub.MODELS, "RN50", hub.Weights("RN50", url, "0" * 64, "openai-clip"))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed: find_spec -> None
    with pytest.raises(ImportError, match="pip install torch"):
        hub.download("RN50", cache=tmp_path, progress=False)
    assert server.requests == []


# ---------------------------------------------------------------------------------------------
# 2: checksum mismatch


def test_checksum_mismatch_names_both_digests_and_leaves_nothing(
    server, clip_files, tmp_path, monkeypatch, capsys
):
    wrong = hashlib.sha256(b"another file").hexdigest()
    _, _, real = _register(monkeypatch, server, clip_files, "npz", sha=wrong)
    cache = tmp_path / "cache"
    assert cli.main(["download", "RN50", "-o", str(tmp_path / "o"), "--cache", str(cache)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the "Downloading" line
    assert err.startswith("regionclip-jax download: error: checksum mismatch")
    assert wrong in err and real in err
    assert not (tmp_path / "o").exists()
    assert not (cache / "checkpoints").exists() or not any((cache / "checkpoints").iterdir())
    assert list((cache / "downloads").iterdir()) == []  # the .part is gone too


# ---------------------------------------------------------------------------------------------
# 3: interrupted downloads resume; a server ignoring Range restarts cleanly


def test_cut_download_resumes_with_a_range_request(
    server, clip_files, by_hand, tmp_path, monkeypatch, capsys
):
    data, _, _ = _register(monkeypatch, server, clip_files, "npz")
    cache, k = tmp_path / "cache", len(data) // 3
    server.state.update(mode="cut", cut_after=k)
    with pytest.raises(hub.DownloadError, match=f"interrupted after {k} of {len(data)} bytes"):
        hub.download("RN50", tmp_path / "o", cache=cache, progress=False)
    assert not (tmp_path / "o").exists() and not (cache / "checkpoints" / "RN50").exists()
    part = cache / "downloads" / "RN50.npz.part"
    assert sorted(p.name for p in (cache / "downloads").iterdir()) == [part.name]
    assert part.read_bytes() == data[:k]

    # Cut again after resuming: the .part grows, the message counts all bytes so far.
    assert cli.main(["download", "RN50", "--cache", str(cache), "-q"]) == 2
    assert f"interrupted after {2 * k} of {len(data)} bytes" in capsys.readouterr().err
    assert server.requests[-1]["range"] == f"bytes={k}-"

    server.state["mode"] = "normal"
    assert cli.main(["download", "RN50", "--cache", str(cache), "-q"]) == 0
    assert server.requests[-1]["range"] == f"bytes={2 * k}-"
    assert (cache / "downloads" / "RN50.npz").read_bytes() == data
    assert not part.exists()
    _assert_same_checkpoint(cache / "checkpoints" / "RN50", by_hand("npz"))


def test_server_ignoring_range_restarts_from_zero(server, clip_files, tmp_path, monkeypatch):
    data, _, _ = _register(monkeypatch, server, clip_files, "npz")
    server.state.update(mode="cut", cut_after=1000)
    with pytest.raises(hub.DownloadError, match="interrupted after 1000 of"):
        hub.fetch(hub.MODELS["RN50"], cache=tmp_path, progress=False)
    server.state["mode"] = "ignore_range"
    path = hub.fetch(hub.MODELS["RN50"], cache=tmp_path, progress=False)
    assert server.requests[-1]["range"] == "bytes=1000-"  # asked to resume, got a 200
    assert path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["RN50.npz"]


def test_a_part_the_server_cannot_continue_restarts_from_zero(
    server, clip_files, tmp_path, monkeypatch
):
    data, _, _ = _register(monkeypatch, server, clip_files, "npz")
    part = tmp_path / "downloads" / "RN50.npz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * (len(data) + 10))  # longer than the file: the server answers 416
    path = hub.fetch(hub.MODELS["RN50"], cache=tmp_path, progress=False)
    assert [r["range"] for r in server.requests] == [f"bytes={len(data) + 10}-", None]
    assert path.read_bytes() == data and not part.exists()


def test_a_cached_file_is_reused_only_if_its_checksum_matches(
    server, clip_files, tmp_path, monkeypatch
):
    data, _, _ = _register(monkeypatch, server, clip_files, "npz")
    path = hub.fetch(hub.MODELS["RN50"], cache=tmp_path, progress=False)
    assert hub.fetch(hub.MODELS["RN50"], cache=tmp_path, progress=False) == path
    assert len(server.requests) == 1
    path.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="expected sha256"):
        assert hub.fetch(hub.MODELS["RN50"], cache=tmp_path, progress=False) == path
    assert len(server.requests) == 2 and path.read_bytes() == data


# ---------------------------------------------------------------------------------------------
# 5: offline, HTTP errors, URLs


def test_offline_and_http_errors(server, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/clip/models/{'a' * 64}/RN50.npz"
    with pytest.raises(hub.OfflineError, match=r"could not reach 127\.0\.0\.1"):
        hub.download(url, cache=tmp_path, progress=False)
    assert cli.main(["download", url, "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("Downloading http://127.0.0.1")
    assert err[1].startswith("regionclip-jax download: error: could not reach") and len(err) == 2

    url, sha = server.serve("gone.npz", b"x")
    server.state["mode"] = "404"
    with pytest.raises(hub.DownloadError, match="HTTP error 404") as raised:
        hub.download(url, cache=tmp_path, progress=False)
    assert not isinstance(raised.value, hub.OfflineError)  # reached: nothing to fall back on
    assert not list((tmp_path / "downloads").iterdir())


def test_url_with_caller_sha256(server, clip_files, by_hand, tmp_path):
    data = clip_files["npz"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    path = "/files/tiny.npz"  # no digest in this URL: the caller gives it
    server.state["files"][path] = data
    url = f"http://127.0.0.1:{server.httpd.server_address[1]}{path}"
    with pytest.raises(ValueError, match="64 hexadecimal"):
        hub.resolve(url, sha256="abc")
    w = hub.resolve(url, sha256=sha.upper())
    assert (w.url, w.sha256, w.kind) == (url, sha, "openai-clip")
    out = hub.download(url, sha256=sha, cache=tmp_path, progress=False)
    assert out == (tmp_path / "checkpoints" / f"tiny-{sha[:12]}").resolve()
    _assert_same_checkpoint(out, by_hand("npz"))


# ---------------------------------------------------------------------------------------------
# 6: RegionCLIP's files (no direct link) and --from


def test_regionclip_names_without_link_say_where_and_how(tmp_path, capsys):
    for name in ("regionclip_pretrained-cc_rn50", "rpn_lvis_866_lsj"):
        assert cli.main(["download", name, "--cache", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"{name}.pth" in err and "MODEL_ZOO" in err and "--from FILE" in err, err
        assert "github.com/microsoft/RegionCLIP" in err
    with pytest.raises(hub.DownloadError, match="no direct download link"):
        hub.fetch(hub.MODELS["rpn_coco_48"], cache=tmp_path)


def _regionclip_npz(path: Path, *, text: bool = True, seed: int = 5) -> dict[str, np.ndarray]:
    """A RegionCLIP detector checkpoint with the spec's key names (§7.2), saved as .npz."""
    from regionclip_jax.convert.state_dict import clip_to_state_dict
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models.presets import CLIPConfig

    sd = {}
    for k, v in clip_to_state_dict(random_clip(CLIPConfig(**TINY_CLIP), seed=seed)).items():
        if k.startswith("visual."):
            sd["backbone." + k[len("visual.") :]] = v
        elif k != "logit_scale" and text:
            sd["lang_encoder." + k] = v
    rng = np.random.default_rng(seed)
    d = TINY_CLIP["embed_dim"]
    p = "roi_heads.box_predictor."
    sd[p + "cls_score.weight"] = rng.standard_normal((4, d)).astype(np.float32)
    sd[p + "bbox_pred.weight"] = rng.standard_normal((4, d)).astype(np.float32)
    sd[p + "bbox_pred.bias"] = rng.standard_normal(4).astype(np.float32)
    np.savez(path, **sd)
    return sd


def test_regionclip_from_file_equals_convert_regionclip(tmp_path, monkeypatch, capsys):
    src = tmp_path / "regionclip_pretrained-cc_rn50.npz"
    sd = _regionclip_npz(src)
    ref = tmp_path / "ref"
    assert cli.main(["convert-regionclip", "--input", str(src), "--output", str(ref)]) == 0
    out = tmp_path / "out"
    argv = ["download", "regionclip_pretrained-cc_rn50", "--from", str(src), "-o", str(out)]
    assert cli.main([*argv, "--cache", str(tmp_path / "cache"), "-q"]) == 0
    _assert_same_checkpoint(out, ref)
    with np.load(out / "regionclip_heads.npz") as z:
        heads = dict(z)
    assert sorted(heads) == ["bbox_pred.bias", "bbox_pred.weight", "cls_score.weight"]
    for k, v in heads.items():
        np.testing.assert_array_equal(v, sd["roi_heads.box_predictor." + k])
    marker = json.loads((out / hub.MARKER_FILE).read_text())
    assert marker["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    capsys.readouterr()
    # The same file again: served from the cache.
    monkeypatch.setattr(hub, "_convert_regionclip", lambda *a, **k: pytest.fail("reconverted"))
    assert cli.main([*argv[:4], "--cache", str(tmp_path / "cache"), "-q"]) == 0


def test_regionclip_without_text_tower_takes_the_openai_one(
    server, clip_files, by_hand, tmp_path, monkeypatch
):
    _register(monkeypatch, server, clip_files, "npz")  # "RN50": the OpenAI CLIP's text tower
    src = tmp_path / "regionclip_finetuned-coco_rn50.npz"
    sd = _regionclip_npz(src, text=False)
    out = hub.download("regionclip_finetuned-coco_rn50", source_file=src, cache=tmp_path)
    got, text_ref = _arrays(out), _arrays(by_hand("npz"))
    for k, v in got.items():
        if "'visual'" in k:
            continue
        if k == "['logit_scale']":  # RegionCLIP files have none: OpenAI's initial value
            np.testing.assert_allclose(v, np.log(1 / 0.07), rtol=1e-6)
            continue
        np.testing.assert_array_equal(v, text_ref[k], err_msg=k)
    np.testing.assert_array_equal(
        got["['visual']['conv1']['kernel']"],
        sd["backbone.conv1.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
    )


def test_rpn_from_file_writes_our_rpn_format(tmp_path):
    from regionclip_jax.convert.detectron2_rpn import rpn_from_detectron2
    from regionclip_jax.convert.rpn import load_rpn_arch, load_rpn_weights
    from regionclip_jax.models.split import split_model

    sd = detectron2_state_dict("c4", base_width=8)
    src = tmp_path / "rpn_coco_48.npz"
    np.savez(src, **sd)
    out = hub.download("rpn_coco_48", source_file=src, cache=tmp_path / "cache", progress=False)
    assert (out / "rpn.json").is_file() and (out / "params.npz").is_file()
    arch = load_rpn_arch(out, pre_nms_topk=None, post_nms_topk=100, nms_thresh=0.7)
    assert (arch["kind"], arch["depth"], arch["base_width"]) == ("c4", 50, 8)
    params, rest = load_rpn_weights(arch)
    _, want_params, want_rest = split_model(rpn_from_detectron2(sd))
    for got, want in ((params, want_params), (rest, want_rest)):
        got_leaves = jax.tree_util.tree_leaves_with_path(got)
        want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
        assert len(got_leaves) == len(want_leaves)
        for path, v in got_leaves:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(want_leaves[path]))
    # One array against the file itself: the head conv, OIHW -> HWIO.
    flat = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }
    (key,) = [k for k in flat if "rpn_head" in k and "'conv'" in k and "kernel" in k]
    np.testing.assert_array_equal(
        flat[key], sd["proposal_generator.rpn_head.conv.weight"].transpose(2, 3, 1, 0)
    )


def test_from_file_with_a_known_digest_must_match(clip_files, tmp_path, monkeypatch):
    other = tmp_path / "RN50.pt"
    other.write_bytes(b"not RN50")
    with pytest.raises(hub.DownloadError, match="expected afeb0e10"):
        hub.download("RN50", source_file=other, cache=tmp_path)
    with pytest.raises(FileNotFoundError):
        hub.download("RN50", source_file=tmp_path / "missing.pt", cache=tmp_path)


# ---------------------------------------------------------------------------------------------
# 7: the registry


def test_registry_digests_are_the_url_path_components():
    openai = {n: w for n, w in hub.MODELS.items() if w.kind == "openai-clip"}
    assert sorted(openai) == sorted(
        "RN50 RN101 RN50x4 RN50x16 RN50x64 ViT-B/32 ViT-B/16 ViT-L/14 ViT-L/14@336px".split()
    )
    for name, w in openai.items():
        parts = w.url.split("/")
        assert w.url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert re.fullmatch(r"[0-9a-f]{64}", parts[-2]) and w.sha256 == parts[-2], name
        assert parts[-1] == name.replace("/", "-").replace("@", "-") + ".pt", name
    for name, w in hub.MODELS.items():
        assert w.kind in hub.KINDS
        if w.kind != "openai-clip":
            assert w.url is None and w.sha256 is None
            assert "docs/MODEL_ZOO.md" in w.where and f"{name}.pth" in w.where


def test_names_resolve_in_every_spelling():
    for spelling, name in [
        ("RN50", "RN50"),
        ("openai:RN50", "RN50"),
        ("rn50x4", "RN50x4"),
        ("ViT-B/32", "ViT-B/32"),
        ("ViT-B-32", "ViT-B/32"),
        ("openai:ViT-B-16", "ViT-B/16"),
        ("ViT-L/14@336px", "ViT-L/14@336px"),
        ("ViT-L-14-336px", "ViT-L/14@336px"),
        ("regionclip_pretrained-cc_rn50", "regionclip_pretrained-cc_rn50"),
        ("rpn_lvis_866_lsj.pth", "rpn_lvis_866_lsj"),
    ]:
        assert hub.resolve(spelling).name == name, spelling
    assert hub.resolve(hub.MODELS["RN101"].url) == hub.MODELS["RN101"]
    with pytest.raises(ValueError, match="unknown model 'RN51'.*RN50, RN101.*ViT-L/14@336px"):
        hub.resolve("RN51")
    with pytest.raises(ValueError, match="contradicts"):
        hub.resolve("RN50", sha256="0" * 64)
    with pytest.raises(ValueError, match="openai:"):
        hub.resolve("openai:rpn_coco_48")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REGIONCLIP_JAX_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REGIONCLIP_JAX_CACHE")
    assert hub.cache_dir() == Path("~/.cache/regionclip_jax").expanduser()


def test_list_prints_every_name(capsys):
    assert cli.main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    for name, w in hub.MODELS.items():
        assert name in out and (w.url or "MODEL_ZOO") in out
    assert cli.main(["download"]) == 2


# ---------------------------------------------------------------------------------------------
# 8: load_clip("openai:RN50")


def test_load_clip_by_name(server, clip_files, by_hand, tmp_path, monkeypatch):
    from regionclip_jax.convert import load_clip

    _register(monkeypatch, server, clip_files, "npz")
    monkeypatch.setenv("REGIONCLIP_JAX_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # a relative path "RN50" must stay a path
    got = nnx.to_pure_dict(nnx.state(load_clip("openai:RN50")))
    want = _arrays(by_hand("npz"))
    flat = {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(got)
    }
    assert sorted(flat) == sorted(want)
    for k in flat:
        np.testing.assert_array_equal(flat[k], want[k], err_msg=k)
    assert len(server.requests) == 1
    with pytest.raises(FileNotFoundError):
        load_clip("RN50")


# ---------------------------------------------------------------------------------------------
# README "Use": the commands as written there


def _readme_use_commands() -> list[list[str]]:
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- use-commands -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_readme_use_commands(server, clip_files, tmp_path, monkeypatch, capsys):
    """README "Use": install, download RN50, classify a photo. The install is the package itself;
    the last two run verbatim (RN50 served from the local server: a tiny random model)."""
    from PIL import Image

    commands = _readme_use_commands()
    assert len(commands) == 3 and commands[0][:2] == ["pip", "install"]
    assert commands[0][2].startswith("regionclip-jax[torch] @ git+")
    _register(monkeypatch, server, clip_files, "npz")
    monkeypatch.setenv("REGIONCLIP_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save("photo.jpg")
    for argv in commands[1:]:
        assert argv[0] == "regionclip-jax"
        assert cli.main(argv[1:]) == 0, capsys.readouterr().err
    assert (tmp_path / "ckpt" / "rn50" / "model.json").is_file()
    result = json.loads((tmp_path / "photo.json").read_text())
    assert result["classes"] == ["cat", "dog", "sofa", "lamp"]
    regions = result["results"][0]["regions"]
    assert [r["box"] for r in regions] == [[40, 60, 380, 420], [400, 90, 620, 400]]
    assert all(r["label"] in result["classes"] for r in regions)
    assert Image.open(tmp_path / "photo_boxes.png").size == (640, 480)
