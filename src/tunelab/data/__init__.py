"""Data: file formats, chat templates and label masking, packing, the data report, the tokenized cache."""

from tunelab.data.batching import collate, epoch_batches, pack_rows, single_rows
from tunelab.data.formats import DataError, Example, load_file
from tunelab.data.prepare import PreparedData, prepare_data
from tunelab.data.tokenize import IGNORE, TokenizedExample, prepare_tokenizer, tokenize_example

__all__ = [
    "IGNORE", "DataError", "Example", "PreparedData", "TokenizedExample", "collate", "epoch_batches", "load_file",
    "pack_rows", "prepare_data", "prepare_tokenizer", "single_rows", "tokenize_example",
]
