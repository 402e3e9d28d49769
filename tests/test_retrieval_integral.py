"""Integral max-pooling against a brute-force generalised mean and the true max."""

from __future__ import annotations

import numpy as np
import torch

from spp_detect.retrieval.aml import level_integral
from spp_detect.retrieval.integral import IntegralImage, integral_max_pool


def random_boxes(rng: np.random.Generator, height: int, width: int, count: int) -> torch.Tensor:
    x = np.sort(rng.integers(0, width + 1, size=(count, 2)), axis=1)
    y = np.sort(rng.integers(0, height + 1, size=(count, 2)), axis=1)
    x[:, 1] = np.maximum(x[:, 1], x[:, 0] + 1).clip(max=width)
    x[:, 0] = np.minimum(x[:, 0], x[:, 1] - 1)
    y[:, 1] = np.maximum(y[:, 1], y[:, 0] + 1).clip(max=height)
    y[:, 0] = np.minimum(y[:, 0], y[:, 1] - 1)
    return torch.from_numpy(np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1))


def brute_force(maps: np.ndarray, boxes: np.ndarray, alpha: float) -> np.ndarray:
    out = np.zeros((len(boxes), maps.shape[0]))
    for n, (x1, y1, x2, y2) in enumerate(boxes):  # the slow reference: one box at a time
        out[n] = (maps[:, y1:y2, x1:x2].astype(np.float64) ** alpha).sum(axis=(1, 2)) ** (1 / alpha)
    return out


def test_equals_brute_force_generalised_mean():
    rng = np.random.default_rng(0)
    maps = rng.gamma(0.5, 20.0, size=(8, 17, 23)) * (rng.random((8, 17, 23)) < 0.4)  # sparse, ReLU-like
    boxes = random_boxes(rng, 17, 23, 300)
    slow = brute_force(maps, boxes.numpy(), 10)
    # power sums: exact up to float64 rounding of the channel's total (the four-term difference)
    integral = IntegralImage(torch.from_numpy(maps))
    totals = (maps.astype(np.float64) ** 10).sum(axis=(1, 2))
    np.testing.assert_allclose(integral.power_sums(boxes).numpy(), slow ** 10, rtol=1e-9, atol=1e-13 * totals.max())
    # the generalised mean itself, on a map whose box maxima are within 10x of the channel max
    flat = 5 + rng.random((8, 17, 23)) * 45
    np.testing.assert_allclose(integral_max_pool(torch.from_numpy(flat), boxes, alpha=10).numpy(),
                               brute_force(flat, boxes.numpy(), 10), rtol=1e-5)


def test_tends_to_true_max_as_alpha_grows():
    rng = np.random.default_rng(1)
    maps = 10 + rng.random((4, 12, 15)) * 40
    boxes = random_boxes(rng, 12, 15, 100)
    true_max = np.stack([[maps[c, y1:y2, x1:x2].max() for c in range(4)] for x1, y1, x2, y2 in boxes.numpy()])
    errors = []
    for alpha in (1, 2, 5, 10):  # float64 integrals lose single cells beyond ~20
        approx = integral_max_pool(torch.from_numpy(maps), boxes, alpha=alpha).numpy()
        assert (approx >= true_max * (1 - 1e-5)).all()  # never below the max (up to the difference's rounding)
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).numpy()[:, None]
        assert (approx <= true_max * area ** (1 / alpha) * (1 + 1e-5)).all()
        errors.append(np.abs(approx / true_max - 1).max())
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < errors[0] / 10


def test_quantised_table_matches_float_powers_exactly():
    rng = np.random.default_rng(2)
    levels = torch.from_numpy(rng.integers(0, 9, size=(6, 20, 30)).astype(np.uint8))
    boxes = random_boxes(rng, 20, 30, 200)
    sums = level_integral(levels).power_sums(boxes).numpy()
    exact = np.stack([[(levels[c, y1:y2, x1:x2].numpy().astype(np.int64) ** 10).sum() for c in range(6)]
                      for x1, y1, x2, y2 in boxes.numpy()])
    assert (sums == exact).all()  # integers below 2**53: float64 is exact
    assert IntegralImage(levels.double()).power_sums(boxes).numpy().tolist() == sums.tolist()
