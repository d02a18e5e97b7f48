"""A model's tokenizer, or a stand-in that says why there is none (compressing needs no text)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from tqcompressor.errors import TQCError, first_line


class MissingTokenizer:
    """Stands in for the tokenizer of a model that has none (a dir of config and weights only).
    Compressing needs no tokenizer; a step that reads or writes text says so when it first uses it."""

    def __init__(self, model: str, reason: str) -> None:
        self._message = (
            f"model {model!r} has no usable tokenizer ({reason}); this step reads or writes text and "
            f"needs one: add the tokenizer files to the model dir (compressing without text needs none)"
        )

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends probe for these
            raise AttributeError(name)
        raise TQCError(self._message)

    def __call__(self, *args, **kwargs):
        raise TQCError(self._message)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer_or_missing(name: str, location: str, gguf_file: str | None):
    """The model's tokenizer, or a :class:`MissingTokenizer` saying why there is none."""
    folder = Path(location)
    # transformers builds an empty tokenizer from config.json alone for some families: insist on real files
    if gguf_file is None and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return MissingTokenizer(name, "its dir holds no tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, TypeError) as exc:
        return MissingTokenizer(name, first_line(exc, limit=10_000) or type(exc).__name__)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
