"""Offline data sets leave the global random state alone."""

from __future__ import annotations

import random

import numpy as np
import torch

from geocomplexity.data import load_mnist1d


def test_mnist1d_shapes_determinism_and_rng_isolation():
    np.random.seed(7)
    random.seed(7)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    a = load_mnist1d()
    assert np.array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py
    assert a.x_train.shape == (4000, 40) and a.x_test.shape == (1000, 40)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert set(a.y_train.unique().tolist()) == set(range(10))
    b = load_mnist1d()
    assert torch.equal(a.x_train, b.x_train)
