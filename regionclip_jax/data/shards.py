"""ArrayRecord shards of schema records: `ShardWriter` writes them, `open_shards`/`ShardReader` read.

On disk, one data set split is a directory:

  out_dir/
    <prefix>-00000-of-00004.array_record   # records in order, msgpack each (see schema.py)
    ...
    <prefix>-00003-of-00004.array_record
    manifest.json                          # schema version, counts, shard list, skips, repairs

Writing is atomic per file: shards are written under hidden temporary names and renamed when the
writer closes; the manifest is written (temp + rename) last, so a directory with a manifest is
complete. A crash leaves no manifest (readers then refuse the directory) and at most hidden
temporary files.

Bad input records follow `schema.sanitize_record`'s policy: each is repaired or skipped and
counted; the manifest lists the counts per reason and the first ids per reason.

Bad shard files (truncated, not ArrayRecord, record count different from the manifest, other
schema version) are found when the shards are opened, before any record is read:
`on_bad_shard="error"` (default) raises `ShardError` naming the file; `on_bad_shard="skip"` leaves
the file out, logs a warning and lists it in `ShardSet.skipped`. A schema-version mismatch always
raises (it is a set-up error, not damage). Records that fail to read or decode later (damage
inside a file that passed the open check) are skipped by the pipeline with a logged warning.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from array_record.python import array_record_module

from regionclip_jax.data.schema import (
    SCHEMA_VERSION,
    SkipRecord,
    check_schema_version,
    decode_record,
    encode_record,
    sanitize_record,
)

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".array_record"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "regionclip_jax.shards"
# group_size:1 makes every record its own chunk: random access reads one record (what a shuffled
# grain pipeline does) at the cost of slightly worse compression.
DEFAULT_WRITER_OPTIONS = "group_size:1"


class ShardError(RuntimeError):
    """A shard file or manifest cannot be used; the message names the file."""


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class ShardWriter:
    """Writes records into `prefix-XXXXX-of-NNNNN.array_record` shards plus `manifest.json`.

    Usage:
      with ShardWriter(out_dir, "train", records_per_shard=1000) as w:
          for rec in records:
              w.write(rec)          # False when the record was skipped (counted)
      manifest = w.manifest

    Records are written in the order given. Every input is either written (possibly repaired)
    or skipped with a reason; `input_records == num_records + sum(skipped.values())`.

    Args:
      out_dir: directory to create (or reuse; see `overwrite`).
      prefix: shard file name prefix.
      records_per_shard: records per file (the last one may hold fewer).
      require_captions, require_boxes, check_images, min_box_size: `sanitize_record` policy.
      check_duplicate_ids: skip (reason `duplicate_id`) a record whose id was already written.
      metadata: JSON-serialisable dict stored in the manifest (e.g. generator arguments).
      overwrite: allow an existing manifest in `out_dir`; the old shards of this prefix are
        removed when the new ones are complete.
      writer_options: ArrayRecord writer options string.
      max_examples: ids kept per skip reason in the manifest.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "data",
        records_per_shard: int = 1000,
        *,
        require_captions: bool = True,
        require_boxes: bool = False,
        check_images: bool = True,
        min_box_size: float = 0.0,
        check_duplicate_ids: bool = True,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        writer_options: str = DEFAULT_WRITER_OPTIONS,
        max_examples: int = 20,
    ):
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        if not prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
        self.out_dir = os.fspath(out_dir)
        self.prefix = prefix
        self.records_per_shard = int(records_per_shard)
        self._policy = dict(
            require_captions=require_captions,
            require_boxes=require_boxes,
            check_image=check_images,
            min_box_size=min_box_size,
        )
        self._check_dupes = check_duplicate_ids
        self._metadata = dict(metadata or {})
        self._writer_options = writer_options
        self._max_examples = max_examples
        manifest_path = os.path.join(self.out_dir, MANIFEST_NAME)
        if os.path.exists(manifest_path) and not overwrite:
            raise FileExistsError(
                f"{manifest_path} exists: shards were already written there (pass overwrite=True "
                "to replace them)"
            )
        os.makedirs(self.out_dir, exist_ok=True)
        self._tmp_paths: list[str] = []
        self._counts: list[int] = []
        self._writer = None
        self._ids: set[int] = set()
        self.input_records = 0
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_examples: dict[str, list[list[str]]] = {}
        self.repaired: collections.Counter = collections.Counter()
        self.totals: collections.Counter = collections.Counter()
        self.manifest: dict[str, Any] | None = None
        self._closed = False

    # -- writing ------------------------------------------------------------------------------

    def _skip(self, reason: str, rid: Any, detail: str) -> bool:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < self._max_examples:
            examples.append([str(rid), detail[:200]])
        return False

    def write(self, record: Mapping[str, Any]) -> bool:
        """Sanitises and writes one record; returns False when it was skipped (and counted)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        self.input_records += 1
        try:
            rec, repairs = sanitize_record(record, **self._policy)
        except SkipRecord as e:
            return self._skip(e.reason, record.get("id"), e.detail)
        if self._check_dupes:
            # Hashes, not strings: millions of ids would otherwise hold gigabytes.
            key = hash(rec["id"])
            if key in self._ids:
                return self._skip("duplicate_id", rec["id"], "id already written")
            self._ids.add(key)
        self.repaired.update(repairs)
        data = encode_record(rec)
        if self._writer is None or self._counts[-1] >= self.records_per_shard:
            self._open_next()
        self._writer.write(data)
        self._counts[-1] += 1
        self.totals["records"] += 1
        self.totals["captions"] += len(rec["captions"])
        if rec["boxes"] is not None:
            self.totals["records_with_boxes"] += 1
            self.totals["boxes"] += len(rec["boxes"])
        if rec["proposals"] is not None:
            self.totals["records_with_proposals"] += 1
        return True

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        idx = len(self._tmp_paths)
        tmp = os.path.join(
            self.out_dir, f".{self.prefix}-{idx:05d}{SHARD_SUFFIX}.tmp-{os.getpid()}"
        )
        self._writer = array_record_module.ArrayRecordWriter(tmp, self._writer_options)
        self._tmp_paths.append(tmp)
        self._counts.append(0)

    def close(self) -> dict[str, Any]:
        """Finishes the shards, renames them into place, writes the manifest and returns it."""
        if self._closed:
            return self.manifest
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        n = len(self._tmp_paths)
        names = [shard_name(self.prefix, i, n) for i in range(n)]
        for tmp, name in zip(self._tmp_paths, names):
            os.replace(tmp, os.path.join(self.out_dir, name))
        # Old shards of this prefix with another shard count (overwrite=True) are stale now.
        for old in glob.glob(
            os.path.join(glob.escape(self.out_dir), f"{self.prefix}-*-of-*{SHARD_SUFFIX}")
        ):
            if os.path.basename(old) not in names:
                os.remove(old)
        self.manifest = {
            "format": MANIFEST_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "prefix": self.prefix,
            "num_records": int(sum(self._counts)),
            "shards": [{"file": f, "num_records": c} for f, c in zip(names, self._counts)],
            "input_records": self.input_records,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": dict(sorted(self.skipped_examples.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "totals": dict(sorted(self.totals.items())),
            "policy": dict(self._policy, check_duplicate_ids=self._check_dupes),
            "writer_options": self._writer_options,
            "metadata": self._metadata,
        }
        _atomic_write_text(
            os.path.join(self.out_dir, MANIFEST_NAME), json.dumps(self.manifest, indent=1) + "\n"
        )
        self._closed = True
        return self.manifest

    def abort(self) -> None:
        """Removes the temporary files; no manifest is written."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for tmp in self._tmp_paths:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def summary(self) -> str:
        """One paragraph: written, skipped and repaired counts."""
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        repaired = ", ".join(f"{k} {v}" for k, v in sorted(self.repaired.items())) or "none"
        return (
            f"{self.totals['records']} of {self.input_records} records written to "
            f"{len(self._tmp_paths)} shard(s) in {self.out_dir}; skipped: {skipped}; "
            f"repaired: {repaired}"
        )


# ---------------------------------------------------------------------------------------------
# Reading.


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates `manifest.json` (`path` is the file or its directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if not os.path.exists(path):
        raise ShardError(
            f"{path} not found: not a shard directory, or its writer did not finish "
            "(the manifest is written last)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: not a regionclip_jax shard manifest")
    check_schema_version(manifest.get("schema_version"), path)
    return manifest


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """Verified shard files in read order.

    Attributes:
      paths: shard files.
      num_records: records per file.
      skipped: (path, reason) of the files left out under `on_bad_shard="skip"`.
      manifests: the manifests the files came from (empty for bare file lists).
    """

    paths: tuple[str, ...]
    num_records: tuple[int, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    manifests: tuple[dict[str, Any], ...] = ()

    def __len__(self) -> int:
        return int(sum(self.num_records))


def _expand(item: str) -> list[tuple[str, int | None, dict | None]]:
    """(shard path, expected record count or None, manifest) for one user-given path."""
    if os.path.isdir(item) or os.path.basename(item) == MANIFEST_NAME:
        manifest = load_manifest(item)
        base = item if os.path.isdir(item) else os.path.dirname(item)
        return [
            (os.path.join(base, s["file"]), int(s["num_records"]), manifest)
            for s in manifest["shards"]
        ]
    if any(c in item for c in "*?["):
        files = sorted(glob.glob(item))
        if not files:
            raise ShardError(f"{item}: no file matches")
        return [(f, None, None) for f in files]
    return [(item, None, None)]


def _check_shard(path: str, expected: int | None) -> tuple[int, str | None]:
    """(record count, problem or None) for one shard file; reads its first record."""
    if not os.path.exists(path):
        return 0, "file not found"
    reader = array_record_module.ArrayRecordReader(path)
    try:
        if not reader.ok():
            return 0, "not a readable ArrayRecord file (truncated or damaged)"
        n = int(reader.num_records())
        if expected is not None and n != expected:
            return n, f"holds {n} records, the manifest says {expected} (truncated or replaced)"
        if n:
            try:
                first = reader.read([0])[0]
            except RuntimeError as e:
                return n, f"first record unreadable ({e})"
            decode_record(first, where=f"{path}[0]")  # SchemaVersionError propagates
        return n, None
    finally:
        try:
            reader.close()
        except RuntimeError:  # closing a reader that failed to open re-raises its error
            pass


def open_shards(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_bad_shard: str = "error",
) -> ShardSet:
    """Resolves and verifies shard files.

    Args:
      paths: one or several of: a shard directory (with `manifest.json`), a manifest file, a glob
        pattern of shard files, a shard file. Order is kept; directories expand to their shards
        in manifest order.
      on_bad_shard: "error" raises `ShardError` naming the first bad file; "skip" leaves bad
        files out (logged, listed in `ShardSet.skipped`). A schema-version mismatch always raises
        `SchemaVersionError`.

    Returns:
      The verified `ShardSet`.
    """
    if on_bad_shard not in ("error", "skip"):
        raise ValueError(f"on_bad_shard must be 'error' or 'skip', got {on_bad_shard!r}")
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    entries = []
    for p in paths:
        entries.extend(_expand(os.fspath(p)))
    if not entries:
        raise ShardError(f"no shard files in {list(map(os.fspath, paths))}")
    good, counts, skipped, manifests = [], [], [], []
    for path, expected, manifest in entries:
        n, problem = _check_shard(path, expected)
        if problem is not None:
            if on_bad_shard == "error":
                raise ShardError(f"{path}: {problem}")
            log.warning("skipping shard %s: %s", path, problem)
            skipped.append((path, problem))
            continue
        good.append(path)
        counts.append(n)
        if manifest is not None and not any(m is manifest for m in manifests):
            manifests.append(manifest)
    return ShardSet(tuple(good), tuple(counts), tuple(skipped), tuple(manifests))


class ShardReader:
    """Random access to the decoded records of a `ShardSet` (or of paths `open_shards` takes).

    `reader[i]` returns the i-th record dict (schema.py) over the concatenation of the shards.
    Single-process convenience for tools and tests; training uses `pipeline.py` (grain).
    """

    def __init__(self, shards: ShardSet | str | os.PathLike | Sequence, *, on_bad_shard="error"):
        self.shards = (
            shards
            if isinstance(shards, ShardSet)
            else open_shards(shards, on_bad_shard=on_bad_shard)
        )
        self._starts = [0]
        for n in self.shards.num_records:
            self._starts.append(self._starts[-1] + n)
        self._readers: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        s = bisect.bisect_right(self._starts, index) - 1
        return s, index - self._starts[s]

    def _reader(self, s: int):
        if s not in self._readers:
            self._readers[s] = array_record_module.ArrayRecordReader(self.shards.paths[s])
        return self._readers[s]

    def read_bytes(self, index: int) -> bytes:
        s, j = self._locate(index)
        return self._reader(s).read([j])[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, j = self._locate(index)
        return decode_record(self._reader(s).read([j])[0], where=f"{self.shards.paths[s]}[{j}]")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for s, n in enumerate(self.shards.num_records):
            reader = self._reader(s)
            for start in range(0, n, 256):
                chunk = reader.read(list(range(start, min(n, start + 256))))
                for j, data in enumerate(chunk):
                    yield decode_record(data, where=f"{self.shards.paths[s]}[{start + j}]")

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
