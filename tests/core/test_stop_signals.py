"""SIGTERM/SIGINT handling (``core.stop_signals``) with real signals sent to this process."""

from __future__ import annotations

import os
import signal

import pytest

from calibrated_rlhf.core import stop_signals


def _mine(signum, frame):  # a handler the process had before
    raise AssertionError("the previous handler ran while ours were installed")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_inside_a_training_loop_a_first_signal_waits_for_the_boundary_a_second_stops_at_once(signum):
    before = signal.signal(signum, _mine)
    try:
        previous = stop_signals.install()
        assert stop_signals.requested() is None
        with stop_signals.deferred():
            os.kill(os.getpid(), signum)  # handled before os.kill returns (main thread)
            assert stop_signals.requested() == signum  # recorded, nothing raised
            with pytest.raises(stop_signals.StopRequested, match=f"stopped by {signal.Signals(signum).name}"):
                os.kill(os.getpid(), signum)
        with pytest.raises(stop_signals.StopRequested, match="after update 3"):
            stop_signals.raise_if_requested("after update 3")
        stop_signals.restore(previous)
        assert signal.getsignal(signum) is _mine
    finally:
        signal.signal(signum, before)


def test_outside_a_training_loop_a_signal_stops_at_once():
    previous = stop_signals.install()
    try:
        with pytest.raises(stop_signals.StopRequested) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.signum == signal.SIGTERM
    finally:
        stop_signals.restore(previous)
    # a new install forgets the earlier request
    stop_signals.restore(stop_signals.install())
    assert stop_signals.requested() is None
