"""Reading, validating and splitting perturbation screens; the safe writer; simulators."""

from __future__ import annotations

from cellpert.data._covariates import covariate_spread, find_covariate_columns
from cellpert.data._io import read_h5ad, results_lock, save_results, to_uns, write_h5ad_atomic
from cellpert.data._layout import (
    COMBINATION_SEP,
    CONTROL_SPELLINGS,
    UNS_KEY,
    as_list,
    is_control_spelling,
    record_screen_keys,
    recorded_screen_keys,
    split_label,
)
from cellpert.data._screen import (
    PerturbationScreen,
    detect_control_labels,
    load_screen,
    parse_perturbation_labels,
    screen_description,
)
from cellpert.data._splits import (
    DEFAULT_SPLIT_KEY,
    SPLIT_NAMES,
    combination_split,
    eligible_heldout_combinations,
    heldout_perturbation_split,
    make_split,
    random_split,
    read_split,
)
from cellpert.data._validate import (
    CountSummary,
    gene_log1p_stats,
    iter_row_chunks,
    summarise_counts,
)

__all__ = [
    "COMBINATION_SEP",
    "CONTROL_SPELLINGS",
    "DEFAULT_SPLIT_KEY",
    "SPLIT_NAMES",
    "UNS_KEY",
    "CountSummary",
    "PerturbationScreen",
    "as_list",
    "combination_split",
    "covariate_spread",
    "detect_control_labels",
    "eligible_heldout_combinations",
    "find_covariate_columns",
    "gene_log1p_stats",
    "heldout_perturbation_split",
    "is_control_spelling",
    "iter_row_chunks",
    "load_screen",
    "make_split",
    "parse_perturbation_labels",
    "random_split",
    "read_h5ad",
    "read_split",
    "record_screen_keys",
    "recorded_screen_keys",
    "results_lock",
    "save_results",
    "screen_description",
    "split_label",
    "summarise_counts",
    "to_uns",
    "write_h5ad_atomic",
]
