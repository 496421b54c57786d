"""Image-text converters to shards, and the resumable part-writing engine all converters share.

Inputs (`regionclip-jax make-shards imagetext ...`):
  - a caption list: JSONL (`{"image": path, "caption": str | "captions": [str]}` per line), TSV or
    CSV (columns `image` / `filepath` / `file_name` / `url`... and `caption` / `text` / `title`;
    a TSV without a header is read as `image<TAB>caption`). Relative paths are resolved against
    `--image-root` (default: the list file's folder). Rows naming the same image are merged (their
    captions kept in order), as COCO-style lists have one row per caption.
  - a folder of images with a caption file beside each (`a.jpg` + `a.txt`), recursively.
  - webdataset tar shards as img2dataset writes them (`00000.tar` holding `KEY.jpg`, `KEY.txt`,
    optional `KEY.json`); the record id is the key (img2dataset's zero-padded sample index).
  - COCO Captions json (`captions_train2017.json`): images + 5 captions each, files under
    `--image-root`; the id is the COCO image id.

Engine (`convert_parts`): the input is cut into *parts* (one per input tar, or `part_size`
images of a list); each part is written by one worker process (decode, validate with the
bad-record policy of `schema.sanitize_record`, write) into `out/parts/<name>/` with its own
manifest. The parent merges the part manifests into `out/manifest.json`, whose shard entries are
relative paths into `parts/`, so `open_shards(out)` / `ShardReader(out)` / the pipelines read the
result like any shard directory.

Resumable and idempotent: a part's manifest stores a fingerprint of its input (paths, sizes,
mtimes, captions, boxes). A rerun skips every part whose manifest exists with the same fingerprint
("resumed"), rewrites the others, and writes the merged manifest again; rerunning a finished
conversion writes nothing but the (identical) merged manifest. An interrupted run leaves finished
parts with manifests and at most one hidden temporary file per unfinished part.

Skipped and repaired inputs: the part writers count per reason (schema.py's policy), plus
`missing_file` (an image named by the list that does not exist or cannot be read) and
`missing_caption` (a tar member or folder image without its caption file). The merged manifest
sums the counts, keeps the first ids per reason, and `format_summary` prints them. Ids that occur
in two different parts (the same image listed twice, far apart) are kept and counted in
`metadata.duplicate_ids_across_parts`: nothing is dropped without a count.

Wrong input is an error, not a silent success: a list, folder or json without images raises
before anything is written; a conversion that writes no record at all (e.g. every image missing
under a wrong `--image-root`) raises after writing the manifest, naming the skip reasons; input
files must be UTF-8 and valid JSON, and a read error names the file (and the line of a list).
Items may carry `size_mismatch` ("error" / "rescale", set by the detection converter): when the
size they state differs from the image file's, `SizeMismatchError` names the image, or the boxes
are rescaled to the real size (counted as `repaired.boxes_rescaled_to_image`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob as _glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from regionclip_jax.data.input_files import json_line, load_json_file, read_utf8
from regionclip_jax.data.schema import SCHEMA_VERSION
from regionclip_jax.data.shards import (
    DEFAULT_WRITER_OPTIONS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    ShardWriter,
    _atomic_write_text,
    load_manifest,
)

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_IMAGE_COLUMNS = ("image", "filepath", "file_path", "file_name", "filename", "path", "url", "img")
_CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentence", "txt")


# ---------------------------------------------------------------------------------------------
# Engine.


@dataclasses.dataclass(frozen=True)
class Part:
    """One unit of work: `task` is a picklable description `write_part` understands.

    Attributes:
      name: folder name under `parts/` (sortable: parts are merged in name order).
      fingerprint: hash of the input; equal fingerprints mean an unchanged input.
      task: ("items", [item dict, ...]) or ("tar", path).
      num_inputs: images in the part, when known before reading it (progress bar total).
    """

    name: str
    fingerprint: str
    task: tuple
    num_inputs: int | None = None


def fingerprint(obj: Any) -> str:
    """sha1 of a JSON-serialisable description of an input."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def file_stamp(path: str) -> list:
    """[path, size, mtime_ns] of a file (or [path, None, None] when it does not exist)."""
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def _count_skip(writer: ShardWriter, reason: str, rid: Any, detail: str) -> None:
    # A skip that happens before `write` (the input never became a record): counted by the
    # writer exactly like its own skips, so the manifest stays the single source of counts.
    writer.input_records += 1
    writer._skip(reason, rid, detail)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SizeMismatchError(ValueError):
    """An annotation's image size differs from the image file's (the boxes would be wrong)."""


def _header_size(image: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header, None when it does not decode."""
    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.size
    except Exception:  # undecodable: the writer counts it as corrupt_image
        return None


def _write_item(writer: ShardWriter, item: Mapping[str, Any]) -> str | None:
    """Loads an item's image (if given by path) and writes it through the writer's policy.

    Returns the id when the record was written, None when it was skipped (and counted).

    Raises:
      SizeMismatchError: the item says `size_mismatch="error"` and its stated size differs from
        the image file's.
    """
    rec = dict(item)
    mismatch = rec.pop("size_mismatch", None)
    path = rec.pop("path", None)
    if rec.get("image") is None:
        try:
            rec["image"] = _read_file(path)
        except (OSError, TypeError) as e:
            _count_skip(writer, "missing_file", rec.get("id"), f"{path}: {e}")
            return None
    rescaled = False
    if rec.get("height") is None or rec.get("width") is None:
        # Lists do not give sizes: read them from the header so that only sizes the input
        # states wrongly count as `size_repaired`.
        size = _header_size(rec["image"])
        if size is not None:
            rec["width"], rec["height"] = size
    elif mismatch is not None:
        size = _header_size(rec["image"])
        stated = (rec["width"], rec["height"])
        if size is not None and tuple(size) != tuple(stated):
            name = path if path is not None else f"record {rec.get('id')}"
            if mismatch != "rescale":
                raise SizeMismatchError(
                    f"image {rec.get('id')} ({name}): the annotations give its size as "
                    f"{stated[0]}x{stated[1]} (width x height) but the file is "
                    f"{size[0]}x{size[1]}; its boxes are in the annotated frame. Fix the json, "
                    "or pass --size-mismatch rescale to scale the boxes to the file's size"
                )
            sx, sy = size[0] / float(stated[0]), size[1] / float(stated[1])
            if rec.get("boxes") is not None:
                b = np.asarray(rec["boxes"], np.float64).reshape(-1, 4)
                rec["boxes"] = (b * [sx, sy, sx, sy]).tolist()
            rec["width"], rec["height"] = size
            rescaled = True
    written = writer.write(rec)
    if written and rescaled:
        writer.repaired["boxes_rescaled_to_image"] += 1
    return rec["id"] if written else None


IDS_NAME = "ids.u64"


def id_digest(rid: str) -> int:
    """A 64-bit digest of an id, the same in every process (Python's hash() is not)."""
    return int.from_bytes(hashlib.blake2b(rid.encode("utf-8"), digest_size=8).digest(), "little")


def _iter_tar(path: str, source: str) -> Iterator[tuple[str, dict | None, str]]:
    """Yields (key, item or None, problem) for the samples of an img2dataset webdataset tar.

    Members are grouped by key (the name up to the first dot of the base name, as webdataset
    does); img2dataset writes a sample's files next to each other, so a group ends when the key
    changes. Tar read errors (a truncated archive) end the part after the samples read so far,
    with the problem reported as one `truncated_tar` skip.
    """

    def finish(key, files):
        img_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        if img_ext is None:
            return key, None, "missing_file"
        if "txt" not in files:
            return key, None, "missing_caption"
        caption = files["txt"].decode("utf-8", errors="replace")
        item = {"id": key, "source": source, "image": files[img_ext], "captions": [caption]}
        return key, item, ""

    key, files = None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base:
                    continue
                k, ext = base.split(".", 1)
                k = (
                    os.path.join(os.path.dirname(member.name), k)
                    if os.path.dirname(member.name)
                    else k
                )
                if k != key and key is not None:
                    yield finish(key, files)
                    files = {}
                key = k
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        if key is not None and files:
            yield finish(key, files)
        yield os.path.basename(path), None, f"truncated_tar: {type(e).__name__}: {e}"
        return
    if key is not None:
        yield finish(key, files)
    if path.endswith(".tar") and not _has_end_marker(path):
        # Cut at a member boundary: tarfile sees a clean end, but the archive lost its tail.
        yield os.path.basename(path), None, "truncated_tar: no end-of-archive marker"


def _has_end_marker(path: str) -> bool:
    """True when an uncompressed tar ends with its two zero blocks (the end-of-archive marker)."""
    size = os.path.getsize(path)
    if size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def write_part(args: tuple) -> dict[str, Any]:
    """Worker: writes one part into its folder; returns its manifest. Picklable entry point."""
    part_dir, part, policy, source, writer_options = args
    kind, payload = part.task
    with ShardWriter(
        part_dir,
        "data",
        records_per_shard=1 << 30,
        overwrite=True,
        metadata={"fingerprint": part.fingerprint, "part": part.name},
        writer_options=writer_options,
        **policy,
    ) as writer:
        written = []
        if kind == "items":
            for item in payload:
                written.append(_write_item(writer, item))
        elif kind == "tar":
            for key, item, problem in _iter_tar(payload, source):
                if item is None:
                    reason, _, detail = problem.partition(": ")
                    _count_skip(writer, reason, key, detail or f"sample {key} in {payload}")
                else:
                    written.append(_write_item(writer, item))
        else:
            raise ValueError(f"unknown part task {kind!r}")
    # Id digests of the part, for the duplicate check across parts without re-reading shards.
    # Written after the manifest: a part without this file counts as unfinished.
    digests = np.array([id_digest(r) for r in written if r is not None], np.uint64)
    tmp = os.path.join(part_dir, f".{IDS_NAME}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(digests.astype("<u8").tobytes())
    os.replace(tmp, os.path.join(part_dir, IDS_NAME))
    return writer.manifest


def _part_is_done(part_dir: str, fp: str) -> dict | None:
    try:
        m = load_manifest(part_dir)
    except Exception:  # missing, unfinished or foreign: rewrite it
        return None
    if not os.path.exists(os.path.join(part_dir, IDS_NAME)):
        return None
    return m if m.get("metadata", {}).get("fingerprint") == fp else None


def convert_parts(
    out_dir: str | os.PathLike,
    parts: Iterable[Part],
    *,
    source: str,
    require_captions: bool = True,
    require_boxes: bool = False,
    check_images: bool = True,
    min_box_size: float = 0.0,
    num_workers: int = 0,
    resume: bool = True,
    metadata: Mapping[str, Any] | None = None,
    extra_repaired: Mapping[str, int] | None = None,
    progress: Callable[[int], Any] | None = None,
    set_total: Callable[[int], Any] | None = None,
    writer_options: str = DEFAULT_WRITER_OPTIONS,
    max_examples: int = 20,
) -> dict[str, Any]:
    """Writes `parts` (in parallel) into `out_dir/parts/` and the merged `out_dir/manifest.json`.

    Args:
      out_dir: output folder (created).
      parts: the input, cut into `Part`s with unique names.
      source: the `source` field of the records.
      require_captions, require_boxes, check_images, min_box_size: the bad-record policy
        (schema.sanitize_record).
      num_workers: processes writing parts (0: in this process).
      resume: skip parts already written with the same fingerprint; False rewrites everything.
      metadata: stored in the merged manifest (e.g. converter arguments, categories).
      extra_repaired: counts of repairs made before the parts (e.g. annotations dropped while
        reading a COCO json), added to the merged manifest's `repaired`.
      progress: called with the number of inputs of each finished part.
      set_total: called once with the total number of inputs when it is known beforehand
        (list and json inputs; not tars).
      writer_options: ArrayRecord writer options.
      max_examples: example ids kept per skip reason.

    Returns:
      The merged manifest (also written to `out_dir/manifest.json`); `metadata.parts` lists each
      part with `resumed` true/false.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, PARTS_DIR), exist_ok=True)
    policy = dict(
        require_captions=require_captions,
        require_boxes=require_boxes,
        check_images=check_images,
        min_box_size=min_box_size,
    )
    parts = list(parts)
    if set_total is not None and all(p.num_inputs is not None for p in parts):
        set_total(sum(p.num_inputs for p in parts))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError("part names must be unique")
    # An old merged manifest would describe a mixture while parts are rewritten: remove it first.
    top = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(top):
        os.remove(top)

    manifests: dict[str, dict] = {}
    resumed: set[str] = set()
    todo = []
    for p in parts:
        part_dir = os.path.join(out_dir, PARTS_DIR, p.name)
        done = _part_is_done(part_dir, p.fingerprint) if resume else None
        if done is not None:
            manifests[p.name] = done
            resumed.add(p.name)
            if progress is not None:
                progress(done["input_records"])
        else:
            todo.append((part_dir, p, policy, source, writer_options))

    def finished(m):
        manifests[m["metadata"]["part"]] = m
        if progress is not None:
            progress(m["input_records"])

    if num_workers > 0 and len(todo) > 1:
        # spawn: the parent may hold JAX/grain threads, which fork does not copy safely.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(num_workers, len(todo))) as pool:
            for m in pool.imap_unordered(write_part, todo):
                finished(m)
    else:
        for t in todo:
            finished(write_part(t))

    merged = merge_manifests(
        [(p.name, manifests[p.name]) for p in parts],
        policy=dict(policy, check_duplicate_ids=True),
        writer_options=writer_options,
        max_examples=max_examples,
    )
    if extra_repaired:
        rep = collections.Counter(merged["repaired"])
        rep.update({k: int(v) for k, v in extra_repaired.items() if v})
        merged["repaired"] = dict(sorted(rep.items()))
    merged["metadata"] = dict(metadata or {})
    merged["metadata"]["source"] = source
    merged["metadata"]["parts"] = [
        {"name": p.name, "fingerprint": p.fingerprint, "resumed": p.name in resumed} for p in parts
    ]
    merged["metadata"]["duplicate_ids_across_parts"] = _cross_part_duplicates(out_dir, parts)
    _atomic_write_text(top, json.dumps(merged, indent=1) + "\n")
    if merged["num_records"] == 0:
        raise ValueError(_nothing_written(out_dir, merged))
    return merged


def _nothing_written(out_dir: str, manifest: Mapping[str, Any]) -> str:
    if manifest["input_records"] == 0:
        return f"no record written to {out_dir}: the input holds no images"
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items())
    first = "; ".join(
        f"{reason}: {ex[0][0]} ({ex[0][1]})"
        for reason, ex in manifest.get("skipped_examples", {}).items()
        if ex
    )
    hint = " (is --image-root right?)" if "missing_file" in manifest["skipped"] else ""
    return (
        f"no record written to {out_dir}: all {manifest['input_records']} input image(s) were "
        f"skipped ({skipped}){hint}; first: {first}"
    )


def merge_manifests(
    named: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    policy: Mapping[str, Any],
    writer_options: str,
    max_examples: int = 20,
) -> dict[str, Any]:
    """One manifest over the parts' shards (paths relative to the output folder)."""
    shards, skipped, repaired, totals = [], collections.Counter(), collections.Counter(), {}
    totals = collections.Counter()
    examples: dict[str, list] = {}
    n_in = 0
    for name, m in named:
        for s in m["shards"]:
            shards.append(
                {"file": f"{PARTS_DIR}/{name}/{s['file']}", "num_records": s["num_records"]}
            )
        n_in += m["input_records"]
        skipped.update(m["skipped"])
        repaired.update(m["repaired"])
        totals.update(m["totals"])
        for reason, ex in m.get("skipped_examples", {}).items():
            keep = examples.setdefault(reason, [])
            keep.extend(ex[: max(0, max_examples - len(keep))])
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "prefix": PARTS_DIR,
        "num_records": int(sum(s["num_records"] for s in shards)),
        "shards": shards,
        "input_records": n_in,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "repaired": dict(sorted(repaired.items())),
        "totals": dict(sorted(totals.items())),
        "policy": dict(policy),
        "writer_options": writer_options,
    }


def _cross_part_duplicates(out_dir: str, parts: Sequence[Part]) -> int:
    """Ids written by more than one part (kept, but counted), from the parts' id digests."""
    if len(parts) < 2:
        return 0
    digests = [
        np.fromfile(os.path.join(out_dir, PARTS_DIR, p.name, IDS_NAME), dtype="<u8") for p in parts
    ]
    # Parts hold no duplicates themselves (the writer skips them): the excess is across parts.
    all_ids = np.concatenate(digests)
    return int(len(all_ids) - len(np.unique(all_ids)))


def format_summary(out_dir: str, manifest: Mapping[str, Any]) -> str:
    """A few lines: written / skipped / repaired / resumed counts of a conversion."""
    parts = manifest.get("metadata", {}).get("parts", [])
    n_resumed = sum(p["resumed"] for p in parts)
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    repaired = ", ".join(f"{k} {v}" for k, v in manifest["repaired"].items()) or "none"
    lines = [
        f"{manifest['num_records']:,} of {manifest['input_records']:,} images written to "
        f"{len(manifest['shards'])} shard(s) in {out_dir} "
        f"({len(parts) - n_resumed} part(s) written, {n_resumed} already complete and kept)",
        f"  skipped: {skipped}",
        f"  repaired: {repaired}",
    ]
    for reason, ex in manifest.get("skipped_examples", {}).items():
        lines.append(f"  first {reason}: " + "; ".join(f"{i} ({d})" for i, d in ex[:3]))
    dup = manifest.get("metadata", {}).get("duplicate_ids_across_parts", 0)
    if dup:
        lines.append(f"  warning: {dup} id(s) occur in more than one part (kept)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Inputs.


def _chunk_parts(items: Sequence[dict], part_size: int, describe: Callable[[dict], Any]):
    for start in range(0, len(items), part_size):
        chunk = items[start : start + part_size]
        name = f"{start // part_size:05d}"
        fp = fingerprint([describe(it) for it in chunk])
        yield Part(name, fp, ("items", chunk), len(chunk))


def _describe_item(item: dict) -> Any:
    # `size_mismatch` is left out: a part finished with "error" had no mismatch, so it is what
    # "rescale" would write too (a changed option does not rewrite finished parts).
    d = {k: v for k, v in item.items() if k not in ("image", "path", "size_mismatch")}
    if "path" in item:
        d["file"] = file_stamp(item["path"])
    return d


def _pick(row: Mapping[str, Any], names: Sequence[str]) -> str | None:
    lower = {str(k).lower(): k for k in row}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def read_caption_list(path: str, image_root: str | None = None) -> list[tuple[str, list[str]]]:
    """(image path, captions) per image from a JSONL / TSV / CSV list; rows of one image merged.

    Raises:
      ValueError: naming the file and line, when the file is not UTF-8, a JSONL line is not
        valid JSON, or a row has no image or caption column.
    """
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1].lower()
    rows: list[tuple[str, list[str]]] = []
    f = io.StringIO(read_utf8(path, "caption list"), newline="")
    if ext in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json_line(line, path, lineno)
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {line.strip():.60}")
            ik, ck = _pick(obj, _IMAGE_COLUMNS), _pick(obj, _CAPTION_COLUMNS)
            if ik is None or ck is None:
                raise ValueError(
                    f"{path}:{lineno}: need an image key ({'/'.join(_IMAGE_COLUMNS[:4])}) "
                    f"and a caption key ({'/'.join(_CAPTION_COLUMNS[:3])}), got {sorted(obj)}"
                )
            if not isinstance(obj[ik], str) or not obj[ik]:
                raise ValueError(f"{path}:{lineno}: the image must be a file name, got {obj[ik]!r}")
            caps = obj[ck]
            rows.append((obj[ik], [caps] if isinstance(caps, str) else list(caps or [])))
    else:
        delim = "\t" if ext in (".tsv", ".txt") else ","
        reader = csv.reader(f, delimiter=delim)
        try:
            first = next(reader, None)
            if first is None:
                return []
            header = [c.strip().lower() for c in first]
            ik = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), None)
            ck = next((header.index(c) for c in _CAPTION_COLUMNS if c in header), None)
            if ik is None or ck is None:
                if delim == "\t" and len(first) >= 2:  # headerless TSV: image<TAB>caption
                    ik, ck = 0, 1
                    rows.append((first[0], [first[1]]))
                else:
                    raise ValueError(
                        f"{path}: header {first} has no image column "
                        f"({'/'.join(_IMAGE_COLUMNS[:4])}) or caption column "
                        f"({'/'.join(_CAPTION_COLUMNS[:3])})"
                    )
            for row in reader:
                if not row:
                    continue
                if len(row) <= max(ik, ck):
                    raise ValueError(
                        f"{path}:{reader.line_num}: {len(row)} column(s), expected more"
                    )
                rows.append((row[ik], [row[ck]]))
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: {e}") from None
    merged: dict[str, list[str]] = {}
    for image, caps in rows:
        full = image if os.path.isabs(image) else os.path.join(root, image)
        merged.setdefault(full, []).extend(caps)
    return list(merged.items())


def _relative_id(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return rel if not rel.startswith("..") else path


def caption_list_parts(
    list_file: str, *, image_root: str | None = None, source: str = "", part_size: int = 5000
) -> list[Part]:
    """Parts of a JSONL/TSV/CSV caption list; ids are image paths relative to the image root.

    Raises:
      ValueError: the list names no image (an empty file, or a header only), or is unreadable.
    """
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(list_file))
    items = [
        {"id": _relative_id(p, root), "source": source, "path": p, "captions": caps}
        for p, caps in read_caption_list(list_file, image_root)
    ]
    if not items:
        raise ValueError(f"{list_file}: the caption list is empty (no image listed)")
    return list(_chunk_parts(items, part_size, _describe_item))


def folder_parts(folder: str, *, source: str = "", part_size: int = 5000) -> list[Part]:
    """Parts of a folder of images with `NAME.txt` captions (one caption per line) beside them.

    An image without its `.txt` gets no caption (then skipped as `no_captions` when captions are
    required). A folder without images is an error; a caption file must be UTF-8.
    """
    items = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, fn)
            txt = os.path.splitext(path)[0] + ".txt"
            caps: list[str] = []
            if os.path.exists(txt):
                caps = [ln for ln in read_utf8(txt, "caption file").splitlines() if ln.strip()]
            items.append(
                {"id": _relative_id(path, folder), "source": source, "path": path, "captions": caps}
            )
    if not items:
        raise ValueError(
            f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below it"
        )
    return list(_chunk_parts(items, part_size, _describe_item))


def webdataset_parts(tars: Sequence[str]) -> list[Part]:
    """One part per webdataset tar (named after the tar); fingerprints are size + mtime."""
    parts = []
    for t in tars:
        stem = os.path.basename(t)
        stem = stem[: -len(".tar")] if stem.endswith(".tar") else stem.replace(".", "_")
        parts.append(Part(stem, fingerprint(file_stamp(os.path.abspath(t))), ("tar", t)))
    return parts


def coco_captions_parts(
    json_path: str, image_root: str, *, source: str = "coco_captions", part_size: int = 5000
) -> list[Part]:
    """Parts of a COCO Captions json; id = str(image id), captions in annotation order.

    Raises:
      ValueError: the json is unreadable (naming the file), lacks `images` / `annotations` or
        has no image, or an entry lacks a needed field.
    """
    data = load_json_file(json_path, "COCO captions json")
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{json_path}: no {key!r} list: not a COCO captions json")
    if not data["images"]:
        raise ValueError(f"{json_path}: the 'images' list is empty: nothing to convert")
    caps: dict[int, list[str]] = collections.defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{json_path}: annotation {i} lacks 'image_id' or 'caption': {ann}")
        caps[ann["image_id"]].append(str(ann["caption"]))
    items = []
    for i, img in enumerate(data["images"]):
        if "id" not in img or "file_name" not in img:
            raise ValueError(f"{json_path}: image {i} lacks 'id' or 'file_name': {img}")
        items.append(
            {
                "id": str(img["id"]),
                "source": source,
                "path": os.path.join(image_root, img["file_name"]),
                "captions": caps.get(img["id"], []),
                "height": img.get("height"),
                "width": img.get("width"),
            }
        )
    return list(_chunk_parts(items, part_size, _describe_item))


def convert_imagetext(
    inputs: Sequence[str],
    out_dir: str,
    *,
    input_format: str = "auto",
    image_root: str | None = None,
    source: str | None = None,
    part_size: int = 5000,
    num_workers: int = 0,
    resume: bool = True,
    check_images: bool = True,
    progress: Callable[[int], Any] | None = None,
    set_total: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Converts image-text data to shards (see the module docstring); returns the manifest.

    Args:
      inputs: list files, tar files (or globs of them), a folder, or one COCO captions json.
      out_dir: output folder.
      input_format: "auto", "list" (JSONL/TSV/CSV), "folder", "webdataset", "coco_captions".
        "auto" decides by the inputs: `.tar` -> webdataset, a folder -> folder, a json with
        `images` and `annotations` -> coco_captions, else list.
      image_root: where relative image paths point (list: default its folder; coco: required).
      source: the records' `source` (default: the format name).
      part_size: images per part for list/folder/coco inputs.
    """
    files: list[str] = []
    for i in inputs:
        expanded = sorted(_glob.glob(i)) if any(c in i for c in "*?[") else [i]
        if not expanded:
            raise FileNotFoundError(f"{i}: no file matches")
        files.extend(expanded)
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: not found")
    fmt = input_format
    if fmt == "auto":
        if all(f.endswith((".tar", ".tar.gz", ".tgz")) for f in files):
            fmt = "webdataset"
        elif len(files) == 1 and os.path.isdir(files[0]):
            fmt = "folder"
        elif len(files) == 1 and files[0].endswith(".json") and _looks_like_coco(files[0]):
            fmt = "coco_captions"
        else:
            fmt = "list"
    source = source or fmt
    if fmt == "webdataset":
        parts = webdataset_parts(files)
    elif fmt == "folder":
        if len(files) != 1:
            raise ValueError("folder input takes one folder")
        parts = folder_parts(files[0], source=source, part_size=part_size)
    elif fmt == "coco_captions":
        if image_root is None:
            raise ValueError("COCO captions need --image-root (the folder of the image files)")
        parts = coco_captions_parts(files[0], image_root, source=source, part_size=part_size)
    elif fmt == "list":
        parts = []
        for k, f in enumerate(files):
            for p in caption_list_parts(
                f, image_root=image_root, source=source, part_size=part_size
            ):
                name = p.name if len(files) == 1 else f"{k:03d}-{p.name}"
                parts.append(dataclasses.replace(p, name=name))
    else:
        raise ValueError(f"unknown input format {input_format!r}")
    return convert_parts(
        out_dir,
        parts,
        source=source,
        require_captions=True,
        check_images=check_images,
        num_workers=num_workers,
        resume=resume,
        metadata={"converter": "imagetext", "format": fmt, "inputs": files},
        progress=progress,
        set_total=set_total,
    )


def _looks_like_coco(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:  # only sniffs: errors come later
        head = f.read(1 << 16)
    return '"images"' in head or '"annotations"' in head or '"info"' in head
