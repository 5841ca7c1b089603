"""Interleaved benchmark timing: the order of calls, the per-round seconds and the paired ratio, on a fake clock."""

import pytest

from benchmarks import timing


def test_interleaved_calls_every_case_once_per_round_and_times_each_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    calls = []

    def case(name, seconds):
        def call():
            calls.append(name)
            clock[0] += seconds

        return call

    times = timing.interleaved([case("a", 1.0), case("b", 3.0)], rounds=3)
    assert calls == ["a", "b"] * 3  # round by round, never all of a then all of b
    assert times == [[1.0] * 3, [3.0] * 3]


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # A slow spell in round 2 doubles both cases: the paired ratio ignores it, a ratio of sums would not.
    a, b = [2.0, 4.0, 2.0, 2.2], [1.0, 2.0, 1.0, 1.0]
    assert timing.paired_ratio(a, b) == pytest.approx(2.0)
    assert timing.paired_ratio(b, a) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        timing.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.interleaved([lambda: None], rounds=0)
