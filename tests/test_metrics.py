import numpy as np
import pytest

from quantize.metrics import bootstrap_ci, roc_auc, sensitivity_specificity


def test_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts half
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert np.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 2)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert roc_auc(y, s) == pytest.approx(pairwise)


def test_sensitivity_specificity():
    assert sensitivity_specificity(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]), 0.5) == (0.5, 0.5)


def test_bootstrap_ci_brackets_the_mean():
    x = np.random.default_rng(1).normal(10, 1, 400)
    lo, hi = bootstrap_ci([str(i) for i in range(400)], lambda idx: float(x[idx].mean()), n_resamples=500)
    assert lo < x.mean() < hi and hi - lo < 0.5
