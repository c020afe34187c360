"""Data: document sources (named offline corpora, the user's files), built corpora (wiki,
en-mix), synthetic generators (bios, long context), the tokenizer and token datasets."""

from .dataset import PreparedData, prepare_dataset
from .sources import CorpusError

__all__ = ["PreparedData", "prepare_dataset", "CorpusError"]
