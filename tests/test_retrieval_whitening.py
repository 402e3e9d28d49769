"""PCA-whitening learned on one set and applied to another."""

from __future__ import annotations

import numpy as np

from spp_detect.retrieval.whitening import Whitening, apply_whitening, l2_normalize, learn_pca_whitening


def test_learn_on_one_set_apply_to_another(tmp_path):
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(16, 16)) * np.linspace(0.1, 3, 16)
    learn = np.abs(rng.normal(size=(500, 16)) @ mixing)
    other = np.abs(rng.normal(size=(40, 16)) @ mixing.T)  # another distribution
    white = learn_pca_whitening(learn)
    assert np.all(np.diff(white.eigenvalues) <= 0)  # descending, no reduction
    projected = (learn - white.mean) @ white.projection.T
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.eye(16), atol=1e-3)
    out = apply_whitening(other, white)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    white.save(tmp_path / "w.npz")
    again = Whitening.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(apply_whitening(other, again), out)


def test_dead_channel_and_zero_vector():
    rng = np.random.default_rng(1)
    learn = np.c_[rng.random((100, 4)), np.zeros(100)]  # channel 4 never fires
    white = learn_pca_whitening(learn)
    assert np.isfinite(white.projection).all()
    np.testing.assert_allclose(np.linalg.norm(apply_whitening(rng.random((3, 5)), white), axis=1), 1, atol=1e-5)
    assert l2_normalize(np.zeros((2, 3))).tolist() == [[0, 0, 0], [0, 0, 0]]
