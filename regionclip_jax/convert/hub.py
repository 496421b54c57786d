"""Pretrained weights by name: download on request, verify, convert once, cache.

  regionclip-jax download RN50                      # -> ~/.cache/regionclip_jax/checkpoints/RN50
  regionclip-jax download ViT-B/16 --output ckpt/vit_b16
  regionclip-jax download regionclip_pretrained-cc_rn50 --from ~/Downloads/regionclip_pretrained-cc_rn50.pth --trust-pickle
  regionclip-jax download https://host/file.pt --sha256 HEX
  regionclip-jax download --list

  from regionclip_jax.convert import hub, load_clip
  directory = hub.download("RN50")                  # a converted checkpoint directory
  model = load_clip("openai:RN50")                  # the same, through load_clip

Nothing is downloaded at import or unless a function here (or `load_clip("openai:NAME")`) is
called. The user-facing description, with the list of names, is `docs/weights.md`.

Names (`MODELS`, `regionclip-jax download --list`):
  - OpenAI's nine CLIP models, `RN50`, `RN101`, `RN50x4`, `RN50x16`, `RN50x64`, `ViT-B/32`,
    `ViT-B/16`, `ViT-L/14`, `ViT-L/14@336px` (kind "openai-clip"): direct links whose URL path
    carries the file's SHA-256. Spellings: `openai:RN50`, `ViT-B-32` (`/` -> `-`), any case.
    Converted exactly as `regionclip-jax convert` does (`convert_clip_file`). Reading these
    TorchScript files needs PyTorch; `download` says so before fetching anything.
  - RegionCLIP's released files (kinds "regionclip", "regionclip-rpn"): `regionclip_pretrained-
    cc_rn50`, `..._rn50x4`, `regionclip_finetuned-{coco,lvis}_{rn50,rn50x4}`, `rpn_lvis_866`,
    `rpn_lvis_866_lsj`, `rpn_coco_48`. They have no direct link (Google Drive / OneDrive through
    RegionCLIP's docs/MODEL_ZOO.md), so `download` raises `DownloadError` saying where to get the
    file; with `source_file=` (CLI `--from FILE`) it converts that file: detector checkpoints as
    `regionclip-jax convert-regionclip` does (CLIP + box-predictor / mask heads; a checkpoint
    without a text tower takes it from the OpenAI CLIP of the same backbone, downloaded by
    name), RPNs into our RPN format (`rpn.json` + `params.npz`, what `load_offline_rpn` and
    `--rpn` read).
  - Any http(s) URL, with the file's SHA-256 from the caller (`sha256=`, `--sha256`); a URL
    whose path holds a 64-hex-digit component (OpenAI's hosting) is checked against it.
    Converted as a CLIP state dict (any format `load_state_dict_file` reads).

Cache (`cache_dir()`: `$REGIONCLIP_JAX_CACHE`, else `~/.cache/regionclip_jax`; the text-embedding
cache of `inference.vocabulary` is `<cache>/text_embeddings`):

  <cache>/downloads/RN50.pt           raw files, SHA-256-checked
  <cache>/downloads/RN50.pt.part      an unfinished download (resumed by the next call)
  <cache>/checkpoints/RN50/           converted checkpoints (`load_clip` reads them) plus
                                      `download.json` ({name, kind, url, file, sha256})

Atomicity: bytes go to `<file>.part`; only a complete file whose SHA-256 matches is `os.replace`d
to its name, so a cache file is always whole and verified. An interrupted download keeps its
`.part` and the next call resumes it with an HTTP Range request (a server that answers 200
instead of 206 makes it start again from byte 0). A checksum mismatch deletes the `.part`.
Conversion writes into a temporary sibling directory that is renamed into place, so a crash
never leaves a half-written checkpoint. A second `download` of the same name finds the converted
checkpoint (its recorded SHA-256 matches) and touches neither the network nor the converter.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any

from regionclip_jax.convert.checkpoint import check_destination, replace_directory, sha256_file

ENV_CACHE = "REGIONCLIP_JAX_CACHE"
KINDS = ("openai-clip", "regionclip", "regionclip-rpn")
# Seconds without progress (connect or read) before a download counts as failed.
TIMEOUT_S = 60.0
MARKER_FILE = "download.json"
# What makes a directory a converted checkpoint: a CLIP / RegionCLIP one, or an RPN.
_MARKERS = ("model.json", "rpn.json")
# `load_clip("openai:RN50")`: a weights name, not a path.
NAME_PREFIX = "openai:"
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MODEL_ZOO = "RegionCLIP's docs/MODEL_ZOO.md (github.com/microsoft/RegionCLIP)"


class DownloadError(OSError):
    """A download that did not give a verified file: network failure, HTTP error, interrupted
    transfer, checksum mismatch, or a file without a direct link. The message says what
    happened and what to do."""


class OfflineError(DownloadError):
    """The server could not be reached at all (no network, DNS failure, connection refused or
    timed out before any answer): the one failure after which falling back to something offline
    is reasonable. A bad file, an HTTP error or a cut transfer is a plain `DownloadError`."""


@dataclasses.dataclass(frozen=True)
class Weights:
    """One downloadable weights file.

    Attributes:
      name: registry name ("RN50", "ViT-B/32", "regionclip_pretrained-cc_rn50").
      url: direct link, None when none exists (RegionCLIP's Google-Drive files).
      sha256: lowercase hex digest of the file, None when unknown.
      kind: "openai-clip" (a CLIP state dict / OpenAI TorchScript file), "regionclip" (a
        RegionCLIP detectron2 checkpoint) or "regionclip-rpn" (a detectron2 RPN checkpoint).
      where: for url=None, where to get the file (shown to the user).
    """

    name: str
    url: str | None
    sha256: str | None
    kind: str
    where: str = ""

    @property
    def filename(self) -> str:
        """The file's name: the URL's last path component, else `<name>.pth`."""
        if self.url:
            base = urllib.parse.unquote(urllib.parse.urlparse(self.url).path.rsplit("/", 1)[-1])
            if base:
                return base
        return f"{self.name.replace('/', '-')}.pth"


def sha256_from_url(url: str) -> str | None:
    """The 64-hex-digit path component of `url` (OpenAI's CLIP URLs carry the file's SHA-256
    there), or None."""
    parts = urllib.parse.urlparse(url).path.split("/")[:-1]
    found = [p for p in parts if _HEX64.fullmatch(p)]
    return found[-1] if found else None


_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_OPENAI_URLS = {
    "RN50": f"{_OPENAI}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_OPENAI}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_OPENAI}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_OPENAI}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_OPENAI}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": (
        f"{_OPENAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt"
    ),
}
# RegionCLIP's released files (spec §1.3-1.4; RegionCLIP's docs/MODEL_ZOO.md): name -> kind.
_REGIONCLIP_FILES = {
    "regionclip_pretrained-cc_rn50": "regionclip",
    "regionclip_pretrained-cc_rn50x4": "regionclip",
    "regionclip_finetuned-coco_rn50": "regionclip",
    "regionclip_finetuned-coco_rn50x4": "regionclip",
    "regionclip_finetuned-lvis_rn50": "regionclip",
    "regionclip_finetuned-lvis_rn50x4": "regionclip",
    "rpn_lvis_866": "regionclip-rpn",
    "rpn_lvis_866_lsj": "regionclip-rpn",
    "rpn_coco_48": "regionclip-rpn",
}

MODELS: dict[str, Weights] = {
    **{
        name: Weights(name, url, sha256_from_url(url), "openai-clip")
        for name, url in _OPENAI_URLS.items()
    },
    **{
        name: Weights(name, None, None, kind, where=f"{_MODEL_ZOO}: the file {name}.pth")
        for name, kind in _REGIONCLIP_FILES.items()
    },
}


def cache_dir() -> Path:
    """`$REGIONCLIP_JAX_CACHE`, else `~/.cache/regionclip_jax` (not created here)."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path("~/.cache/regionclip_jax").expanduser()


def _spellings(name: str) -> set[str]:
    w = MODELS[name]
    keys = {name, name.replace("/", "-"), Path(w.filename).stem}
    return {k.lower() for k in keys}


def _check_sha256(value: str) -> str:
    v = value.strip().lower()
    if not _HEX64.fullmatch(v):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {value!r}")
    return v


def resolve(name_or_url: str, sha256: str | None = None) -> Weights:
    """The `Weights` a name or URL stands for.

    Args:
      name_or_url: a `MODELS` name in any of its spellings ("RN50", "openai:RN50", "rn50",
        "ViT-B/32", "ViT-B-32", "ViT-L-14-336px", "regionclip_pretrained-cc_rn50[.pth]"), or an
        http(s) URL.
      sha256: the file's hex digest (URLs; for a name it must equal the registry's, if known).

    Raises:
      ValueError: an unknown name (the message lists the known ones), a malformed sha256, or a
        sha256 that contradicts the registry's.
    """
    text = str(name_or_url).strip()
    given = _check_sha256(sha256) if sha256 is not None else None
    if re.match(r"https?://", text, re.IGNORECASE):
        for w in MODELS.values():  # a registry URL keeps its name (and its cache entry)
            if w.url == text:
                return _with_sha(w, given)
        url_sha = sha256_from_url(text)
        if given and url_sha and given != url_sha:
            raise ValueError(f"--sha256 {given} contradicts the digest in the URL ({url_sha})")
        name = Path(urllib.parse.urlparse(text).path).stem or "download"
        return Weights(name, text, given or url_sha, "openai-clip")
    openai = text.lower().startswith("openai:")
    key = text[len("openai:") :] if openai else text
    key = re.sub(r"\.(pt|pth)$", "", key.strip(), flags=re.IGNORECASE).replace("/", "-").lower()
    for name in MODELS:
        if key in _spellings(name):
            w = MODELS[name]
            if openai and w.kind != "openai-clip":
                raise ValueError(f"{text!r}: 'openai:' names OpenAI's CLIP models; {name} is not")
            return _with_sha(w, given)
    raise ValueError(
        f"unknown model {text!r}; known names: {', '.join(MODELS)} (or an http(s) URL with --sha256)"
    )


def _with_sha(w: Weights, given: str | None) -> Weights:
    if given is None or given == w.sha256:
        return w
    if w.sha256 is not None:
        raise ValueError(
            f"--sha256 {given} contradicts the registry's digest of {w.name} ({w.sha256})"
        )
    return dataclasses.replace(w, sha256=given)


def describe_models() -> str:
    """The registry as text, one name per line (`regionclip-jax download --list`)."""
    width = max(len(n) for n in MODELS) + 2
    lines = []
    for name, w in MODELS.items():
        where = w.url if w.url else f"no direct link: {w.where}; then --from FILE"
        lines.append(f"{name:<{width}}{w.kind:<16}{where}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ fetch


def _is_registry_entry(w: Weights) -> bool:
    return MODELS.get(w.name) == w


def _cache_stem(w: Weights) -> str:
    """File stem / directory name of `w` in the cache: the file's stem for registry entries;
    other URLs add a digest so that two files of one name do not share an entry."""
    stem = Path(w.filename).stem
    if _is_registry_entry(w) or (MODELS.get(w.name) and MODELS[w.name].url == w.url):
        return stem
    tag = w.sha256 or hashlib.sha256((w.url or w.name).encode()).hexdigest()
    return f"{stem}-{tag[:12]}"


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _no_link(w: Weights) -> DownloadError:
    return DownloadError(
        f"{w.name} has no direct download link: get {w.filename} from {w.where or _MODEL_ZOO} "
        f"and rerun with --from FILE (Python: source_file=FILE)"
    )


def fetch(weights: Weights, *, cache: Path | None = None, progress: bool = True) -> Path:
    """The raw file of `weights` in `<cache>/downloads`, downloaded if needed.

    A file already there is reused when its SHA-256 matches (or when none is known); otherwise
    it is downloaded into `<file>.part` (resuming a `.part` an earlier call left), checked and
    renamed into place.

    Args:
      weights: what to fetch (`resolve`); needs a `url`.
      cache: cache root (default `cache_dir()`).
      progress: show a progress bar and messages on stderr.

    Returns:
      The path of the verified file.

    Raises:
      DownloadError: no URL, the server unreachable, an HTTP error, an interrupted transfer (the
        `.part` stays for the next call to resume), or a checksum mismatch (the `.part` is
        deleted).
    """
    if weights.url is None:
        raise _no_link(weights)
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    dest = downloads / (_cache_stem(weights) + Path(weights.filename).suffix)
    if dest.is_file():
        if weights.sha256 is None or sha256_file(dest) == weights.sha256:
            return dest
        warnings.warn(
            f"{dest} does not have the expected sha256 {weights.sha256}; downloading it again",
            stacklevel=2,
        )
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    _say(f"Downloading {weights.url}", progress)
    _download_to(weights.url, part, progress=progress)
    actual = sha256_file(part)
    if weights.sha256 is not None and actual != weights.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {weights.url}: expected sha256 {weights.sha256}, got "
            f"{actual}; the download was deleted. Rerun to try again; if it happens again the "
            "file at that URL is not the expected one (for a URL: check --sha256)"
        )
    if weights.sha256 is None:
        _say(f"No checksum was given; the file's sha256 is {actual}", progress)
    os.replace(part, dest)
    return dest


def _download_to(url: str, part: Path, *, progress: bool, _restarted: bool = False) -> None:
    """Appends the rest of `url` to `part` (from byte 0 if there is no `part`)."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    host = urllib.parse.urlparse(url).netloc
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset and not _restarted:
            # The .part is not a prefix the server can continue (e.g. the file changed): restart.
            part.unlink(missing_ok=True)
            return _download_to(url, part, progress=progress, _restarted=True)
        raise DownloadError(
            f"HTTP error {e.code} ({e.reason}) for {url}; check the name or URL"
            + ("; the server may be down, try again later" if e.code >= 500 else "")
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise OfflineError(
            f"could not reach {host} ({reason}); check the network connection, or download "
            f"{url} by other means and rerun with --from FILE"
        ) from None
    with response:
        status = getattr(response, "status", 200)
        resumed = bool(offset) and status == 206 and _range_start(response) == offset
        if status == 206 and not resumed:
            # A partial answer that does not continue the .part: start again from byte 0.
            if _restarted:
                raise DownloadError(f"{url}: the server sent a partial file that was not asked for")
            response.close()
            part.unlink(missing_ok=True)
            return _download_to(url, part, progress=progress, _restarted=True)
        if offset and not resumed:
            _say(
                f"The server does not resume downloads; restarting {part.name} from zero", progress
            )
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        written = offset
        from tqdm.auto import tqdm  # lazy: only downloads draw a progress bar

        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[: -len(".part")],
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, timeout
                f.flush()
                raise _interrupted(url, written, total, e) from None
    if total is not None and written < total:
        raise _interrupted(url, written, total, "connection closed early")


def _interrupted(url: str, written: int, total: int | None, cause: object) -> DownloadError:
    of = f" of {total}" if total is not None else ""
    why = type(cause).__name__ if isinstance(cause, BaseException) else str(cause)
    return DownloadError(
        f"download of {url} interrupted after {written}{of} bytes ({why}); rerun to resume"
    )


def _range_start(response: Any) -> int | None:
    m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(m[1]) if m else None


def _user_agent() -> str:
    from regionclip_jax import __version__

    return f"regionclip-jax/{__version__} (+urllib)"


# ------------------------------------------------------------------------------- convert


def convert_clip_file(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    activation: str = "quick_gelu",
    trust_pickle: bool = False,
    source_sha256: str | None = None,
) -> Path:
    """A CLIP state-dict file (OpenAI `.pt`, `torch.save`, `.npz`, `.safetensors`) -> a
    checkpoint directory: `load_state_dict_file` -> `infer_config` -> `clip_from_state_dict` ->
    `save_clip` (what `regionclip-jax convert` runs).

    Args:
      activation: "quick_gelu" (OpenAI) or "gelu" (open_clip's own ViT trainings).
      trust_pickle: see `load_state_dict_file`.
      source_sha256: the file's digest if known (else `save_clip` hashes the file).

    Returns:
      The absolute checkpoint directory.
    """
    # lazy: JAX and the readers load only when something is converted
    from regionclip_jax.convert.checkpoint import check_destination, save_clip
    from regionclip_jax.convert.state_dict import clip_from_state_dict, infer_config
    from regionclip_jax.convert.torch_files import load_state_dict_file

    # Fail before the (possibly long) conversion; save_clip checks again when writing.
    check_destination(directory, overwrite=overwrite)
    sd = load_state_dict_file(source, trust_pickle=trust_pickle)
    config = infer_config(sd, activation=activation)
    model = clip_from_state_dict(sd, config=config)
    del sd  # the model holds its own copy; free the host arrays before writing
    return save_clip(
        model, directory, overwrite=overwrite, source=source, source_sha256=source_sha256
    )


def _convert_regionclip(
    w: Weights, source: Path, directory: Path, *, trust_pickle: bool, cache: Path, progress: bool
) -> None:
    # lazy: JAX and the readers load only when something is converted
    from regionclip_jax.convert.regionclip import regionclip_from_state_dict, save_regionclip
    from regionclip_jax.convert.torch_files import load_state_dict_file

    sd = load_state_dict_file(source, trust_pickle=trust_pickle)
    text_sd = None
    if "lang_encoder.text_projection" not in sd:
        # Transfer checkpoints saved without their text tower: it is the OpenAI CLIP's of the
        # same backbone (RegionCLIP never trains the text encoder in transfer).
        backbone = re.search(r"_(rn50x4|rn50)$", w.name)
        if backbone is None:
            raise ValueError(
                f"{source} has no text tower (lang_encoder.*); convert it with "
                "`regionclip-jax convert-regionclip --text-from CLIP_FILE`"
            )
        clip_name = {"rn50": "RN50", "rn50x4": "RN50x4"}[backbone[1]]
        _say(f"{source.name} has no text tower; taking {clip_name}'s (OpenAI CLIP)", progress)
        text_file = fetch(MODELS[clip_name], cache=cache, progress=progress)
        text_sd = load_state_dict_file(text_file)
    with warnings.catch_warnings():
        # The offline-RPN keys a merged checkpoint holds are expected here: not worth a warning.
        warnings.filterwarnings("ignore", message="RegionCLIP checkpoint: .* keys not loaded")
        weights = regionclip_from_state_dict(sd, text_state_dict=text_sd, load_teacher=False)
    del sd
    save_regionclip(weights, directory, source=source)


def _convert_rpn(source: Path, directory: Path, *, trust_pickle: bool) -> None:
    # lazy: JAX and the readers load only when something is converted
    from flax import nnx

    from regionclip_jax.convert.detectron2_rpn import infer_rpn_architecture, load_detectron2_rpn
    from regionclip_jax.convert.rpn import build_rpn, export_rpn
    from regionclip_jax.convert.torch_files import load_state_dict_file
    from regionclip_jax.models.split import split_model

    sd = load_state_dict_file(source, trust_pickle=trust_pickle)
    arch = infer_rpn_architecture(sd)
    # Shapes only: every value comes from the file (an eager init of a ResNet-50 takes seconds).
    model = load_detectron2_rpn(sd, nnx.eval_shape(lambda: build_rpn(arch, nnx.Rngs(0))))
    _, params, rest = split_model(model)
    export_rpn(arch, params, rest, str(directory))


def _checkpoint_files(directory: Path) -> bool:
    return any((directory / m).is_file() for m in _MARKERS)


def _cached(directory: Path, sha256: str | None) -> bool:
    """True if `directory` is a complete converted checkpoint of the file with `sha256` (any
    file of that name when `sha256` is None)."""
    try:
        meta = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return _checkpoint_files(directory) and (sha256 is None or meta.get("sha256") == sha256)


def _convert_into(
    w: Weights,
    source: Path,
    dest: Path,
    *,
    sha256: str,
    trust_pickle: bool,
    cache: Path,
    progress: bool,
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    _say(f"Converting {source} ({w.kind})", progress)
    try:
        if w.kind == "regionclip":
            _convert_regionclip(
                w, source, tmp, trust_pickle=trust_pickle, cache=cache, progress=progress
            )
        elif w.kind == "regionclip-rpn":
            _convert_rpn(source, tmp, trust_pickle=trust_pickle)
        else:
            convert_clip_file(source, tmp, trust_pickle=trust_pickle, source_sha256=sha256)
        marker = {
            "name": w.name,
            "kind": w.kind,
            "url": w.url,
            "file": source.name,
            "sha256": sha256,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        replace_directory(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _needs_torch(filename: str) -> bool:
    return filename.lower().endswith(_TORCH_SUFFIXES) and importlib.util.find_spec("torch") is None


def download(
    name_or_url: str,
    output: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    source_file: str | os.PathLike | None = None,
    cache: Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> Path:
    """A converted checkpoint of `name_or_url`: downloaded, verified and converted once, cached.

    Args:
      name_or_url: a `MODELS` name (see `resolve`) or an http(s) URL.
      output: also write the checkpoint here (a copy of the cached one).
      sha256: the file's expected digest (URLs; for names the registry's is used).
      source_file: convert this file instead of downloading (RegionCLIP's files, which have no
        direct link; or offline use). Its digest is checked when the registry knows it.
      cache: cache root (default `cache_dir()`).
      progress: progress bar and messages on stderr.
      overwrite: replace an existing checkpoint at `output`.
      trust_pickle: allow pickled Python objects in `torch.save`d files (RegionCLIP's released
        `.pth` files store NumPy arrays that way; trusted files only).

    Returns:
      `output` (absolute) if given, else the cached checkpoint directory
      (`<cache>/checkpoints/<name>`): a `save_clip` directory (`load_clip`), for RegionCLIP
      detectors plus the heads (`load_regionclip`), for RPNs `rpn.json` + `params.npz`.

    Raises:
      DownloadError: see `fetch`; also a name without a direct link and no `source_file`, and a
        `source_file` whose digest is not the registry's.
      ValueError: an unknown name, or a file that does not convert.
      ImportError: the file is a PyTorch file and torch is not installed (checked before
        downloading).
      FileExistsError: `output` exists and `overwrite` is False.
      FileNotFoundError: no `source_file`.
    """
    w = resolve(name_or_url, sha256)
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    out = (
        check_destination(output, overwrite=overwrite, markers=_MARKERS)
        if output is not None
        else None
    )
    target = root / "checkpoints" / _cache_stem(w)
    source = Path(source_file).expanduser() if source_file is not None else None
    expected = w.sha256
    if source is not None:
        if not source.is_file():
            raise FileNotFoundError(errno.ENOENT, "No such file", str(source))
        actual = sha256_file(source)
        if expected is not None and actual != expected:
            raise DownloadError(
                f"{source} is not {w.filename}: its sha256 is {actual}, expected {expected}"
            )
        expected = actual
    if not _cached(target, expected):
        if source is None:
            if w.url is None:
                raise _no_link(w)
            if _needs_torch(w.filename):
                raise ImportError(
                    f"{w.filename} is a PyTorch file and converting it needs PyTorch: "
                    "`pip install torch` (or `pip install 'regionclip-jax[torch]'`); nothing "
                    "was downloaded"
                )
            source = fetch(w, cache=root, progress=progress)
            expected = w.sha256 or sha256_file(source)
        assert expected is not None
        _convert_into(
            w,
            source,
            target,
            sha256=expected,
            trust_pickle=trust_pickle,
            cache=root,
            progress=progress,
        )
    if out is None:
        return target.resolve()
    if out != target.resolve():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copytree(target, tmp)
            replace_directory(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_clip(name_or_directory: str | os.PathLike, **kwargs: Any):
    """`checkpoint.load_clip` that also takes a weights name: `"openai:RN50"`, `"openai:ViT-B/16"`
    (downloaded and converted on first use, then read from the cache: `download`). The `openai:`
    prefix marks a name; any other string is a checkpoint directory. `regionclip_jax.convert.
    load_clip` is this function. Keyword options (`dtype`, `param_dtype`) as `checkpoint.load_clip`.
    """
    from regionclip_jax.convert.checkpoint import load_clip as load_directory

    if isinstance(name_or_directory, str) and name_or_directory.startswith(NAME_PREFIX):
        name_or_directory = download(name_or_directory[len(NAME_PREFIX) :])
    return load_directory(name_or_directory, **kwargs)
