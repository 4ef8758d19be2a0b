"""The Harmony encoding, loaded without the network: openai-harmony downloads its o200k
vocabulary on first use unless TIKTOKEN_ENCODINGS_BASE names a folder that has it, so the
official file ships in shared/data and is used when that variable is unset."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

DATA = Path(__file__).resolve().parent / "data"
VOCAB = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


class VocabularyError(RuntimeError):
    pass


def check_vocabulary(folder: Path = DATA) -> Path:
    path = folder / VOCAB
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabularyError(f"{path}: sha256 {digest} is not the official {VOCAB}")
    return path


@functools.cache
def encoding() -> HarmonyEncoding:
    """Blocking the first time (reads the vocabulary): call it once at start-up. The
    package is imported here, not above: the `model` command should not pay for it."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        check_vocabulary()
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(DATA)
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
