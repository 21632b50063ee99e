"""Temperature scaling, ECE and reliability bins on hand-made and simulated logits."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from lib.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    reliability_diagram,
    served_calibration,
    softmax,
)

N_CLASSES = 15


def simulate(n: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction (labels drawn from it), multiplied by scale."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.0, size=(n, N_CLASSES))
    probs = softmax(true_logits)
    # Inverse-CDF sampling of one label per row from its own distribution.
    labels = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1).clip(0, N_CLASSES - 1)
    return true_logits * scale, labels


def test_softmax_rows_sum_to_one_and_temperature_one_is_identity():
    logits = np.random.default_rng(0).normal(0, 5, size=(50, N_CLASSES))
    probs = softmax(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax(logits, temperature=1.0), expected, rtol=1e-10)
    np.testing.assert_allclose(softmax(logits, 2.0), softmax(logits / 2.0), rtol=1e-12)
    # Large logits must not overflow.
    assert np.isfinite(softmax(np.array([[1000.0, 0.0, -1000.0]]))).all()


def test_overconfident_logits_recover_temperature_three():
    # 20k examples: the fitted T has a sampling spread of about 0.013 (checked over 10 seeds), so 0.15 is generous.
    logits, labels = simulate(20_000, seed=1, scale=3.0)
    temperature = fit_temperature(logits, labels)
    assert temperature > 1.0
    assert temperature == pytest.approx(3.0, abs=0.15)


def test_underconfident_logits_give_temperature_below_one():
    logits, labels = simulate(20_000, seed=2, scale=0.5)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, abs=0.05)


def test_temperature_fitted_on_one_split_lowers_the_nll_of_another():
    """Fitted on 3,000 overconfident validation logits, T lowers the NLL of 5,000 held-out logits from the same model
    to within 0.005 of the best any temperature achieves there (T = 1 is about 0.6 nats worse on these)."""
    val_logits, val_labels = simulate(3_000, seed=3, scale=2.5)
    test_logits, test_labels = simulate(5_000, seed=9, scale=2.5)
    t = fit_temperature(val_logits, val_labels)
    held_out = nll(test_logits, test_labels, t)
    best = min(nll(test_logits, test_labels, s) for s in np.linspace(1.5, 4.0, 251))
    assert held_out < nll(test_logits, test_labels) - 0.2
    assert held_out <= best + 0.005


def test_served_calibration_fits_on_validation_and_only_measures_test():
    """Validation logits overconfident (x3), test logits underconfident (x0.5): T is validation's, whatever the test
    split holds; accuracy, F1, ECE and NLL are the test logits' at that T."""
    val_logits, val_labels = simulate(8_000, seed=10, scale=3.0)
    test_logits, test_labels = simulate(3_000, seed=11, scale=0.5)
    served = served_calibration(val_logits, val_labels, test_logits, test_labels)
    assert served["temperature"] == pytest.approx(fit_temperature(val_logits, val_labels), rel=1e-9)
    assert served["temperature"] == pytest.approx(3.0, abs=0.2)
    shuffled = np.random.default_rng(0).permutation(len(test_labels))
    other = served_calibration(val_logits, val_labels, test_logits[shuffled] * 4, test_labels)
    assert other["temperature"] == served["temperature"]
    predictions = test_logits.argmax(1)
    assert served["accuracy"] == pytest.approx(np.mean(predictions == test_labels))
    assert served["nll"] == pytest.approx(nll(test_logits, test_labels, served["temperature"]))
    assert served["ece"] == pytest.approx(
        expected_calibration_error(softmax(test_logits, served["temperature"]), test_labels)
    )
    assert (served["test_images"], served["validation_images"]) == (3_000, 8_000)
    assert served_calibration(val_logits, val_labels, test_logits, test_labels, fit=False)["temperature"] == 1.0


def test_served_f1_is_weighted_and_macro_over_every_class():
    """Hand-computed F1 of 7 predictions over 4 classes, one never predicted nor present (it counts 0 in the macro
    mean, as in the evaluated model's figures)."""
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2, 0])
    logits = np.eye(4)[predicted] * 5.0
    served = served_calibration(logits[:0], labels[:0], logits, labels, fit=False)
    # class 0: precision 2/3, recall 2/3 -> 2/3; class 1: 1/2, 1/2 -> 1/2; class 2: 1/2, 1/2 -> 1/2; class 3: 0
    f1 = np.array([2 / 3, 1 / 2, 1 / 2, 0.0])
    assert served["accuracy"] == pytest.approx(4 / 7)
    assert served["f1_macro"] == pytest.approx(f1.mean())
    assert served["f1_weighted"] == pytest.approx(float(f1 @ np.array([3, 2, 2, 0])) / 7)


def test_fitted_temperature_minimises_nll():
    logits, labels = simulate(2_000, seed=4, scale=2.0)
    t = fit_temperature(logits, labels)
    assert nll(logits, labels, t) <= min(nll(logits, labels, t * 0.9), nll(logits, labels, t * 1.1))


def test_calibrate_reduces_ece_and_nll_on_test_split():
    val_logits, val_labels = simulate(10_000, seed=5, scale=3.0)
    test_logits, test_labels = simulate(10_000, seed=6, scale=3.0)
    result = calibrate(val_logits, val_labels, test_logits, test_labels)
    assert set(result) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}
    assert result["temperature"] == pytest.approx(3.0, abs=0.2)
    assert result["ece_after"] < result["ece_before"]
    assert result["ece_after"] < 0.02
    assert result["nll_after"] < result["nll_before"]


def test_ece_of_perfectly_calibrated_data_is_near_zero():
    # Labels drawn from the predicted probabilities: the true ECE is 0; the estimate is biased upwards by
    # binomial noise: about sqrt(2/pi) * sum_b w_b * sqrt(acc_b (1 - acc_b) / n_b) <= 0.4 * sqrt(15 / N) ~ 0.005
    # (Cauchy-Schwarz over the bins); measured 0.003-0.004 over seeds, so 0.01 leaves room but catches real bias.
    logits, labels = simulate(100_000, seed=7)
    assert expected_calibration_error(softmax(logits), labels) < 0.01


def test_ece_hand_computed():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # confidence 0.90, correct -> bin (0.8, 1.0]
            [0.10, 0.70, 0.20],  # confidence 0.70, wrong   -> bin (0.6, 0.8]
            [0.25, 0.75, 0.00],  # confidence 0.75, correct -> bin (0.6, 0.8]
            [0.30, 0.25, 0.45],  # confidence 0.45, wrong   -> bin (0.4, 0.6]
        ]
    )
    labels = np.array([0, 0, 1, 0])
    # Bins: (0.8,1]: |1 - 0.9| = 0.1, n=1; (0.6,0.8]: |0.5 - 0.725| = 0.225, n=2; (0.4,0.6]: |0 - 0.45| = 0.45, n=1.
    # ECE = (1 * 0.1 + 2 * 0.225 + 1 * 0.45) / 4 = 0.25
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.25, abs=1e-12)
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins["count"].tolist() == [0, 0, 1, 2, 1]
    assert bins.loc[3, "confidence"] == pytest.approx(0.725)
    assert bins.loc[3, "accuracy"] == pytest.approx(0.5)
    assert np.isnan(bins.loc[0, "accuracy"])


def test_reliability_bins_edges_and_counts():
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.6, 0.4]])
    bins = reliability_bins(probs, np.array([0, 0, 1]), n_bins=2)
    assert list(bins.columns) == ["bin_lower", "bin_upper", "count", "confidence", "accuracy"]
    # Bins are (lo, hi]: 0.5 falls in the first bin, 1.0 in the last.
    assert bins["count"].tolist() == [1, 2]
    assert bins["count"].sum() == len(probs)


def test_reliability_diagram_has_two_titled_panels():
    logits, labels = simulate(2_000, seed=8, scale=3.0)
    t = fit_temperature(logits, labels)
    before, after = reliability_bins(softmax(logits), labels), reliability_bins(softmax(logits, t), labels)
    fig = reliability_diagram(before, after, 0.123, 0.0456)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert len(titles) == 2
        assert "0.123" in titles[0] and "0.046" in titles[1]
    finally:
        plt.close(fig)
