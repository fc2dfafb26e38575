"""The KL controllers' update laws, written out independently, and their state through a checkpoint."""

import math

import pytest

from calibrated_rlhf.core.kl_controller import (AdaptiveKLController, FixedKLController, PIKLController,
                                                make_kl_controller)


def test_ziegler_update_is_the_clipped_proportional_law():
    ctl = AdaptiveKLController(beta=0.1, kl_target=4.0, horizon=1000)
    assert ctl.update(kl=4.4, n_episodes=100) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # err 0.1, inside the clip
    assert ctl.update(kl=40.0, n_episodes=100) == pytest.approx(0.1 * 1.01 * (1 + 0.2 * 0.1))  # err clipped at 0.2
    assert ctl.steps == 2
