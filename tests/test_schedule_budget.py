"""The dense jobs' wall-clock budget: the progress bar's expected total."""
from transnext.tasks.common.schedule import TimeBudget


def test_expected_iters_follows_the_pace():
    # 50 s of a 100 s budget (10 s reserved: 90 s of training) spent on 500 iterations
    b = TimeBudget(100, elapsed=50.0)
    assert 890 <= b.expected_iters(500, 6000) <= 901
    assert b.expected_iters(500, 700) == 700  # never above the iteration cap
    assert b.expected_iters(0, 6000) == 6000  # no pace yet


def test_expected_iters_never_below_done():
    b = TimeBudget(100, elapsed=200.0)  # over budget: the run is about to stop
    assert b.expected_iters(1234, 6000) == 1234
