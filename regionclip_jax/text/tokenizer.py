"""CLIP byte-pair-encoding tokenizer with the original text cleaning.

RegionCLIP (like OpenAI CLIP and open_clip) tokenizes text as follows (spec §3):

  1. `ftfy.fix_text`, then `html.unescape` twice, then strip;
  2. collapse every whitespace run to one space, strip;
  3. lower-case;
  4. split with the CLIP regex and byte-pair-encode with the 49,408-entry CLIP vocabulary;
  5. wrap as `[SOT] + tokens + [EOT]` (SOT = 49406, EOT = 49407) in a zero-padded row of
     `context_length` (77) ids.

Steps 1-3 run here in Python; step 4 runs in the Rust backend `instant_clip_tokenizer`, which
embeds the CLIP vocabulary and reproduces the CLIP regex and BPE but does no `ftfy` or HTML
unescaping of its own. Step 5 (and truncation) is done here so that all three truncation modes
share one code path.

Truncation modes (`truncate=`) for texts with more than `context_length - 2` BPE tokens:

  - `"clip"`: open_clip / OpenAI `truncate=True`: keep the first `context_length` ids and
    overwrite the last one with EOT, so the text encoder still pools at an EOT token.
  - `"regionclip"`: RegionCLIP's pretraining data path (`convert_example_to_features_bpe`,
    `convert_txt_to_tokens_bpe`): keep the first `context_length` ids and do NOT re-append EOT.
    The text encoder pools at `argmax(ids)`, i.e. at the highest-id token of the truncated text
    (wherever it is) rather than at EOT, so long captions get an embedding of an arbitrary
    word position. Use it only to reproduce RegionCLIP's numbers on long captions.
  - `"error"`: raise `ValueError` naming the offending text.

Quirks kept for equality with open_clip: a literal `<start_of_text>` / `<end_of_text>` inside a
text is encoded as the special id (open_clip's regex lists the special tokens first). RegionCLIP's
own copy spells them `<|startoftext|>` / `<|endoftext|>` instead; real captions contain neither.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Sequence
from typing import Literal

import ftfy
import instant_clip_tokenizer
import numpy as np

SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

TruncateMode = Literal["clip", "regionclip", "error"]
_TRUNCATE_MODES = ("clip", "regionclip", "error")


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy, double HTML unescape, whitespace collapse, lower-case.

    `str.split()` (no argument) splits on the same characters as CLIP's `regex` `\\s+`, except for
    U+001C..U+001F, which `ftfy.fix_text` has already removed (and `html.unescape` maps their
    numeric references to ''), so the two whitespace rules agree on every input.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


@functools.cache
def _backend():
    # Building the Rust tokenizer parses the embedded vocabulary (tens of ms): do it once per
    # process. The object is not picklable, which is why `Tokenizer` does not store it.
    return instant_clip_tokenizer.Tokenizer()


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes | bytearray) or not isinstance(texts, Sequence | np.ndarray):
        raise TypeError(
            f"texts must be a str or a sequence of str, got {type(texts).__name__}",
        )
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, np.str_):
            t = str(t)
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r:.40}")
        out.append(t)
    return out


class Tokenizer:
    """CLIP BPE tokenizer (cleaning as in CLIP/RegionCLIP, ids as in open_clip).

    Cheap to construct and picklable (grain worker processes can hold one): the Rust backend is
    created lazily, once per process, and shared.

    Attributes:
      context_length: default row length (77 for every CLIP model).
      truncate: default truncation mode, one of "clip", "regionclip", "error" (see module doc).
    """

    sot_id = SOT_ID
    eot_id = EOT_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, context_length: int = CONTEXT_LENGTH, truncate: TruncateMode = "clip"):
        _check_args(context_length, truncate)
        self.context_length = context_length
        self.truncate = truncate

    def encode(self, text: str) -> list[int]:
        """BPE ids of one cleaned `text`, without SOT/EOT and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return _backend().encode(clean_text(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a sequence of ids (lower-cased, cleaned; not always the original text).

        A leading SOT is dropped and decoding stops at the first EOT, so a padded row from
        `tokenize` decodes to its text. Rows truncated in "regionclip" mode have no EOT and no
        padding (they are full), so they decode whole.
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if ids and ids[0] == SOT_ID:
            ids = ids[1:]
        if EOT_ID in ids:
            ids = ids[: ids.index(EOT_ID)]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids out of range [0, {VOCAB_SIZE}): {bad[:5]}")
        return _backend().decode(ids).strip()

    def tokenize(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        truncate: TruncateMode | None = None,
    ) -> np.ndarray:
        """Token ids of a batch of texts.

        Args:
          texts: one string or a sequence of N strings.
          context_length: row length; defaults to `self.context_length`.
          truncate: "clip", "regionclip" or "error"; defaults to `self.truncate`.

        Returns:
          int32 [N, context_length] (N = 1 for a single string): SOT, the BPE ids, EOT, then
          zeros. An empty or whitespace-only text gives [SOT, EOT, 0, ...].

        Raises:
          TypeError: `texts` (or an element of it, named by index) is not a str.
          ValueError: a text is too long and truncate="error", or bad arguments.
        """
        context_length = self.context_length if context_length is None else context_length
        truncate = self.truncate if truncate is None else truncate
        _check_args(context_length, truncate)
        texts = _as_text_list(texts)
        backend = _backend()
        out = np.zeros((len(texts), context_length), np.int32)
        for i, text in enumerate(texts):
            ids = [SOT_ID, *backend.encode(clean_text(text)), EOT_ID]
            if len(ids) > context_length:
                if truncate == "error":
                    raise ValueError(
                        f"texts[{i}] ({text[:40]!r}) has {len(ids)} tokens with SOT/EOT, more "
                        f"than context_length={context_length}"
                    )
                ids = ids[:context_length]
                if truncate == "clip":
                    ids[-1] = EOT_ID
            out[i, : len(ids)] = ids
        return out

    __call__ = tokenize


def _check_args(context_length: int, truncate: str) -> None:
    if truncate not in _TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {_TRUNCATE_MODES}, got {truncate!r}")
    if isinstance(context_length, bool) or not isinstance(context_length, int | np.integer):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(
            f"context_length must be >= 2 (room for SOT and EOT), got {context_length}"
        )


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide default `Tokenizer` (context 77, "clip" truncation)."""
    return Tokenizer()


def tokenize(
    texts: str | Sequence[str],
    context_length: int = CONTEXT_LENGTH,
    truncate: TruncateMode = "clip",
) -> np.ndarray:
    """CLIP token ids: int32 [N, context_length]; see `Tokenizer.tokenize` and the module doc.

    Equal to `open_clip.tokenize(texts, context_length)` for truncate="clip".
    """
    return get_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)
