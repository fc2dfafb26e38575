"""The batch and running normalizations RL can optimize instead of the frozen z-score, against plain numpy."""

import numpy as np

from calibrated_rlhf.core.normalization import RunningNormalizer, minmax_batch, whiten_batch


def test_whiten_batch_is_the_population_z_score():
    x = np.array([1.0, 2.0, 4.0, 9.0])
    np.testing.assert_allclose(whiten_batch(x), (x - x.mean()) / (x.std() + 1e-8))


def test_minmax_batch_maps_the_batch_onto_0_1():
    np.testing.assert_allclose(minmax_batch(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])


def test_running_normalizer_scores_each_batch_against_all_batches_so_far():
    norm = RunningNormalizer(clip=None)
    a, b = np.array([0.0, 2.0]), np.array([4.0, 6.0])
    norm(a)
    seen = np.concatenate([a, b])
    np.testing.assert_allclose(norm(b), (b - seen.mean()) / seen.std())
