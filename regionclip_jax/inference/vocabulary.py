"""Vocabularies (the user's words) and the on-disk cache of their class embeddings.

Class embeddings are RegionCLIP's: the mean of the text tower's un-normalised outputs over the 81
prompt templates (`regionclip_jax.text.prompt_ensemble_embeddings`, spec §3), stored
un-normalised ([K, D] float32 .npy; consumers normalise). The cache key is a SHA-256 of the
checkpoint identity (its `model.json` content and path, which changes whenever it is re-saved),
the word list (order included) and the templates, so a stale file is never reused. The cache
directory is `<root>/text_embeddings`, root `$REGIONCLIP_JAX_CACHE` or `~/.cache/regionclip_jax`
(the downloaded weights' root too: `convert.hub`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from regionclip_jax.convert.hub import cache_dir
from regionclip_jax.data.input_files import read_utf8
from regionclip_jax.text.tokenizer import clean_text


def parse_vocabulary(vocabulary: str | os.PathLike | Sequence[str]) -> list[str]:
    """The words of a vocabulary, one class each.

    Args:
      vocabulary: a list of words; a path to a UTF-8 text file (one word per line, blank lines
        and lines starting with '#' skipped); or a comma-separated string ("cat,dog"). A string
        without a comma that looks like a path (it contains '/' or '\\', or is one token ending
        in an extension such as `words.txt`) must be an existing file: a mistyped file name is an
        error, not a one-class vocabulary. To use such a string as a word, add a comma
        ("dog.png,") or pass a list.

    Two words that are the same text after the tokenizer's own cleaning (`text.tokenizer.
    clean_text`: ftfy, HTML unescaping, whitespace collapsed, lower-case; e.g. "Cat" and "cat ",
    or "hot  dog" and "Hot Dog") would embed identically, so they are not two classes: that is an
    error naming both spellings (and their lines in a file).

    Raises:
      FileNotFoundError: a path-like vocabulary that is not a file.
      ValueError: no words, duplicate words, or a file that is not UTF-8 (naming the line).
    """
    if (
        isinstance(vocabulary, str)
        and not os.path.isfile(vocabulary)
        and _looks_like_path(vocabulary)
    ):
        raise FileNotFoundError(
            f"vocabulary file {vocabulary} not found (to use the text as a class name, add a "
            f"comma: '{vocabulary.strip()},')"
        )
    # (word, where it is: "line 3" of a file or "word 2" of a list) of each entry.
    entries: list[tuple[str, str]] = []
    if isinstance(vocabulary, os.PathLike) or (
        isinstance(vocabulary, str) and os.path.isfile(vocabulary)
    ):
        text = read_utf8(vocabulary, "vocabulary file")
        for lineno, ln in enumerate(text.splitlines(), 1):
            w = ln.strip()
            if w and not w.startswith("#"):
                entries.append((w, f"line {lineno}"))
        where = f"vocabulary file {os.fspath(vocabulary)}"
    elif isinstance(vocabulary, str):
        for i, w in enumerate(vocabulary.split(",")):
            if w.strip():
                entries.append((w.strip(), f"item {i + 1}"))
        where = "vocabulary"
    else:
        for i, w in enumerate(vocabulary):
            if not isinstance(w, str):
                raise ValueError(f"vocabulary entries must be strings, got {w!r:.60}")
            if w.strip():
                entries.append((w.strip(), f"item {i + 1}"))
        where = "vocabulary"
    if not entries:
        raise ValueError(f"{where} is empty: give at least one word (e.g. 'cat,dog')")
    first: dict[str, tuple[str, str]] = {}
    dupes = []
    for w, at in entries:
        key = clean_text(w)
        if key in first:
            dupes.append(f"{first[key][0]!r} ({first[key][1]}) and {w!r} ({at})")
        else:
            first[key] = (w, at)
    if dupes:
        more = f" (and {len(dupes) - 3} more)" if len(dupes) > 3 else ""
        raise ValueError(
            f"{where}: duplicate classes: {'; '.join(dupes[:3])}{more} are the same text after "
            "the tokenizer's normalisation (case, spaces, HTML entities): give each class once"
        )
    return [w for w, _ in entries]


# One token (no spaces) ending in a 1-5 character extension: `words.txt`, `vocab.json`.
_FILE_NAME = re.compile(r"[^\s,]+\.[A-Za-z0-9]{1,5}")


def _looks_like_path(value: str) -> bool:
    value = value.strip()
    return "," not in value and ("/" in value or "\\" in value or bool(_FILE_NAME.fullmatch(value)))


def default_cache_dir() -> Path:
    """`<root>/text_embeddings`, root `$REGIONCLIP_JAX_CACHE` or `~/.cache/regionclip_jax`: the
    same root as the downloaded weights (`convert.hub.cache_dir`)."""
    return cache_dir() / "text_embeddings"


def checkpoint_identity(directory: str | os.PathLike) -> str:
    """A string that changes whenever the checkpoint at `directory` is re-written."""
    directory = Path(directory).expanduser().resolve()
    meta = (directory / "model.json").read_text(encoding="utf-8")
    return f"{directory}\n{meta}"


def cache_key(identity: str, words: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps([identity, list(words), list(templates)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """`[K, D]` class-embedding arrays on disk, keyed by `cache_key`.

    Writes go to a temporary file renamed into place, so concurrent readers never see a partial
    file. `directory=None` disables caching (compute every time).
    """

    def __init__(self, directory: str | os.PathLike | None = "default"):
        if directory == "default":
            directory = default_cache_dir()
        self.directory = None if directory is None else Path(directory)

    def get_or_compute(
        self,
        identity: str | None,
        words: Sequence[str],
        templates: Sequence[str],
        compute: Callable[[], np.ndarray],
        *,
        embed_dim: int,
    ) -> np.ndarray:
        """Cached `compute()` (float32 [len(words), embed_dim]); no caching if identity is None."""
        if self.directory is None or identity is None:
            return np.asarray(compute(), np.float32)
        key = cache_key(identity, words, templates)
        path = self.directory / f"{key}.npy"
        if path.is_file():
            try:
                emb = np.load(path, allow_pickle=False)
                if emb.shape == (len(words), embed_dim):
                    return emb
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed and replaced
        emb = np.asarray(compute(), np.float32)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, emb)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache must not break inference
            warnings.warn(f"could not write the text-embedding cache {path}: {e}", stacklevel=2)
        return emb
