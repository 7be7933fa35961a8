"""Tools for people who fine-tune and curate: a linear probe on frozen embeddings (``probe``),
weight interpolation between a model and its fine-tuned copy (``merge``), image-caption pair
scores (``score``), exact and near-duplicate groups in an index (``dedup``), and filtering an
index by a query (``filter``). Each is a ``coembed`` command; these are the functions behind them.
"""

from coembed.curate.dedup import Duplicates, find_duplicates, write_duplicates
from coembed.curate.filter import FilterResult, filter_index
from coembed.curate.merge import Sweep, merge_models, merge_sweep, write_sweep
from coembed.curate.probe import (
    LinearProbe,
    ProbeResult,
    classify_folder,
    linear_probe,
    write_probe,
)
from coembed.curate.score import PairScores, ScoreFiles, score_dataset, score_pairs

__all__ = [
    "Duplicates",
    "FilterResult",
    "LinearProbe",
    "PairScores",
    "ProbeResult",
    "ScoreFiles",
    "Sweep",
    "classify_folder",
    "filter_index",
    "find_duplicates",
    "linear_probe",
    "merge_models",
    "merge_sweep",
    "score_dataset",
    "score_pairs",
    "write_duplicates",
    "write_probe",
    "write_sweep",
]
