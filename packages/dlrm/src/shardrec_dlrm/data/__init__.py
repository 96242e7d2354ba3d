"""Criteo data for the dlrm app: raw and preprocessed readers, splits, batches, preprocessing,
synthesis.

Start with :func:`open_dataset` (see :mod:`.dataset` for an example), or :func:`open_multihot` for
MLPerf-style multi-hot days (:mod:`.multihot`); ``docs/data.md`` describes the
formats, the transform and the split rules.
"""

from __future__ import annotations

from .batch import Batch, make_batch
from .dataset import Dataset, Split, SplitReader, open_dataset
from .errors import DataError
from .layout import PartMeta, PreprocessedMeta, read_metadata
from .multihot import MultiHotDataset, MultiHotSplit, materialize, open_multihot
from .preprocess import PreprocessReport, preprocess
from .reader import read_file
from .schema import (
    DENSE_NAMES,
    MISSING_ID,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_KEYS,
    SPARSE_NAMES,
    Rows,
    hash_ids,
    parse_num_embeddings,
    transform_dense,
)
from .sources import discover
from .splits import SPLIT_NAMES, split_segments
from .synth import SplitOptimum, SynthInfo, read_synth_info, synth

__all__ = [
    "DENSE_NAMES",
    "MISSING_ID",
    "NUM_DENSE",
    "NUM_SPARSE",
    "SPARSE_KEYS",
    "SPARSE_NAMES",
    "SPLIT_NAMES",
    "Batch",
    "DataError",
    "Dataset",
    "MultiHotDataset",
    "MultiHotSplit",
    "PartMeta",
    "PreprocessReport",
    "PreprocessedMeta",
    "Rows",
    "Split",
    "SplitOptimum",
    "SplitReader",
    "SynthInfo",
    "discover",
    "hash_ids",
    "make_batch",
    "materialize",
    "open_dataset",
    "open_multihot",
    "parse_num_embeddings",
    "preprocess",
    "read_file",
    "read_metadata",
    "read_synth_info",
    "split_segments",
    "synth",
    "transform_dense",
]
