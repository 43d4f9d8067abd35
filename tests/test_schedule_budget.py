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


class _Bar:
    total = None
    closed = False

    def close(self):
        self.closed = True


def test_last_iteration_stops_when_spent_and_moves_the_bar():
    bar = _Bar()
    spent = TimeBudget(100, elapsed=200.0)
    assert spent.last_iteration(40, 6000, "cpu", bar) and bar.total == 40
    assert not spent.last_iteration(6000, 6000, "cpu", bar)  # the cap ends it anyway
    fresh, bar = TimeBudget(100, elapsed=45.0), _Bar()
    assert not fresh.last_iteration(500, 6000, "cpu", bar)
    assert 890 <= bar.total <= 1001  # 500 iterations in half the training time
    bar.total = None
    assert not fresh.last_iteration(501, 6000, "cpu", bar) and bar.total is None  # every 10


def test_closing_loop_says_where_to_resume_and_closes(tmp_path, capsys):
    import pytest

    from transnext.tasks.common.checkpoints import closing_loop

    class Log:
        closed = False

        def close(self):
            self.closed = True

    bar, mlog, it = _Bar(), Log(), 3
    (tmp_path / "last.pth").write_bytes(b"")
    with pytest.raises(KeyboardInterrupt):
        with closing_loop(tmp_path, True, bar, mlog, lambda: it):
            it = 7
            raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert "interrupted at iteration 7" in err and f"--resume {tmp_path / 'last.pth'}" in err
    assert bar.closed and mlog.closed
    mlog = Log()
    with closing_loop(tmp_path, True, None, mlog, lambda: 0):
        pass
    assert mlog.closed and capsys.readouterr().err == ""
