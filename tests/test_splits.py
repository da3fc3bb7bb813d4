"""Splits: random cell split, held-out perturbations, Norman combination / data-efficiency."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from cellpert import CellpertInputError, CellpertWarning
from cellpert.data import (
    DEFAULT_SPLIT_KEY,
    eligible_heldout_combinations,
    load_screen,
    make_split,
    random_split,
)

from conftest import make_toy_adata


@pytest.fixture(scope="module")
def norman(norman_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellpertWarning)
        return load_screen(norman_path, subset='dataset == "norman19"')


def test_random_split_fractions_and_seed():
    a = random_split(1000, seed=1)
    assert (a == "train").sum() == 640 and (a == "val").sum() == 160 and (a == "test").sum() == 200
    np.testing.assert_array_equal(a, random_split(1000, seed=1))
    assert (a != random_split(1000, seed=2)).any()
    with pytest.raises(CellpertInputError, match="sum to 1"):
        random_split(10, fractions=(0.5, 0.2, 0.2))


def test_split_stored_in_obs():
    screen = load_screen(make_toy_adata())
    series = make_split(screen, "random", seed=0)
    assert DEFAULT_SPLIT_KEY in screen.adata.obs
    assert series.cat.categories.tolist() == ["train", "val", "test", "unused"]


def test_heldout_perturbation_split():
    screen = load_screen(make_toy_adata())
    split = make_split(screen, "heldout", heldout=["A+B"]).to_numpy()
    assert set(split[screen.labels == "A+B"]) == {"test"}
    assert "test" not in set(split[screen.labels != "A+B"])
    with pytest.raises(CellpertInputError, match="not labels"):
        make_split(screen, "heldout", heldout=["Z"])


def test_norman_combination_split_holds_out_only_covered_doubles(norman):
    combos = norman.combination_labels
    heldout = eligible_heldout_combinations(norman, seed=0)
    assert len(heldout) == math.ceil(0.25 * len(combos)) == 4
    split = make_split(norman, "combinations", seed=0).to_numpy()
    assert set(split[np.isin(norman.labels, heldout)]) == {"test"}
    assert set(split[~np.isin(norman.labels, heldout)]) == {"train", "val"}
    train_labels = set(norman.labels[split == "train"])
    for combo in heldout:
        for part in norman.label_parts(combo):
            # every part is seen in training, alone or in a training combination
            assert any(part in norman.label_parts(lab) for lab in train_labels), (combo, part)
    # another seed gives another test set
    assert set(eligible_heldout_combinations(norman, seed=3)) != set(heldout)


def test_data_efficiency_split_keeps_test_set_and_drops_combinations(norman):
    full = make_split(norman, "combinations", seed=2).to_numpy()
    none = make_split(norman, "data-efficiency", seed=2, fraction=0.0).to_numpy()
    half = make_split(norman, "data-efficiency", seed=2, fraction=0.5).to_numpy()
    np.testing.assert_array_equal(full == "test", none == "test")
    np.testing.assert_array_equal(full == "test", half == "test")
    is_combo = np.isin(norman.labels, norman.combination_labels)
    # fraction 0 keeps only the training combinations needed to see every part of a test
    # combination (CNN1, SAMD1 and PTPN12 have no single label in this subset)
    kept = {lab for lab in norman.labels[is_combo & (none != "test") & (none != "unused")]}
    assert kept == {"BPGM+SAMD1", "CBL+CNN1", "PTPN12+PTPN9"}
    used = {lab for lab in norman.labels[(half == "train") | (half == "val")] if lab in norman.combination_labels}
    assert len(used) == round(0.5 * 11) + 1  # + CBL+CNN1, for CNN1
    # singles and controls: 80/20 train/val
    single = ~is_combo
    frac_val = (none[single] == "val").mean()
    assert 0.17 < frac_val < 0.23


def test_combination_split_needs_combinations():
    adata = make_toy_adata()
    adata = adata[adata.obs["perturbation"] != "A+B"].copy()
    screen = load_screen(adata, warn=False)
    with pytest.raises(CellpertInputError, match="no combinations"):
        make_split(screen, "combinations")
