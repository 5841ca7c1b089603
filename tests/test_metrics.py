"""ROC metrics of membership inference, checked by hand."""

import numpy as np
import pytest

from trustsgd_jax import metrics


def test_roc_points_auc_and_tpr_by_hand():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    m = np.array([1, 1, 0, 1, 0, 0], bool)
    fpr, tpr, _ = metrics.roc_curve(s, m)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert metrics.auc(s, m) == pytest.approx(8 / 9)  # 8 of 9 member/non-member pairs ordered right
    assert metrics.auc(m.astype(float), m) == 1.0
    assert metrics.auc(-m.astype(float), m) == 0.0
    assert metrics.auc(np.zeros(6), m) == 0.5  # all tied: the diagonal
    # The curve runs (0, 2/3) -> (1/3, 2/3) -> (1/3, 1): flat in between.
    assert metrics.tpr_at_fpr(s, m, 1 / 6) == pytest.approx(2 / 3)
    # A member and a non-member tied at 0.5: a diagonal segment, interpolated linearly.
    tie_s, tie_m = np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)
    assert metrics.tpr_at_fpr(tie_s, tie_m, 0.25) == pytest.approx(0.75)
    assert metrics.tpr_at_fpr(s, m, 0.0) == pytest.approx(2 / 3)
    big = np.r_[np.ones(1000), np.zeros(1000)].astype(bool)
    assert metrics.tpr_at_fpr(np.r_[np.ones(1000), np.linspace(0, 0.5, 1000)], big, 0.001) == 1.0
    acc, thr = metrics.best_balanced_accuracy(s, m)
    assert acc == pytest.approx((1 + 2 / 3) / 2) and thr == 0.6
    assert metrics.balanced_accuracy_at(s, m, 0.6) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.balanced_accuracy_at(s, m, 0.85) == pytest.approx((1 / 3 + 1) / 2)  # one member above, no non-member


def test_affine_invariant_ssim_separates_lost_brightness_from_nothing():
    import numpy as np

    from trustsgd_jax import metrics

    rng = np.random.default_rng(0)
    x = rng.random((3, 16, 16, 3)).astype(np.float32)
    dimmed = 0.3 * x + 0.5  # structure kept, brightness and contrast lost
    noise = rng.random((3, 16, 16, 3)).astype(np.float32)
    assert np.all(metrics.ssim(x, dimmed) < 0.9)
    np.testing.assert_allclose(metrics.affine_invariant_ssim(x, dimmed), 1.0, atol=1e-4)
    assert np.all(metrics.affine_invariant_ssim(x, noise) < 0.2)
    flat = np.full_like(x, 0.7)  # a constant reconstruction: the fit gives the original's mean, not a crash
    assert np.all(np.isfinite(metrics.affine_invariant_ssim(x, flat)))
