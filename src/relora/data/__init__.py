"""Corpus preparation (`prepare`), prepared-data loading and training windows for ReLoRA pretraining."""

from relora.data.corpus import default_corpus_files
from relora.data.preparation import prepare, prepare_default_corpus
from relora.data.store import PreparedData, load_prepared
from relora.data.windows import TokenWindows
from relora.errors import DataError

__all__ = ["DataError", "PreparedData", "TokenWindows", "default_corpus_files", "load_prepared", "prepare", "prepare_default_corpus"]
