"""Admission by expected wait (issue 34): a request whose work ahead, at the measured seconds per megapixel,
would pass its deadline is refused at once with Retry-After; the others are admitted. The real Batcher."""
import pytest

from app.batcher import ADMIT_SHARE, Batcher, WaitTooLong


def test_admission_counts_the_work_ahead_against_the_deadline():
    b = Batcher(None, max_batch=4, max_wait_s=0.01, queue_size=100)
    with b.slot() as first:
        first.expect(4_000_000, False, 10.0)  # no rate measured yet: admitted by count alone
    assert b.waiting_mp["batch"] == 0  # its slot closed: its work is gone
    b.rates["batch"].observe(2.0, 1.0)  # 2 s per megapixel
    held = []
    try:
        for _ in range(4):  # 4 x 1 MP = 8 s, the share of a 10 s deadline
            ctx = b.slot()
            slot = ctx.__enter__()
            held.append(ctx)
            slot.expect(1_000_000, False, 10.0)
        assert b.waiting_mp["batch"] == pytest.approx(4.0)
        with b.slot() as late, pytest.raises(WaitTooLong) as refused:
            late.expect(1_000_000, False, 10.0)
        assert refused.value.retry_after >= 1 and "deadline" in refused.value.detail
        with b.slot() as large:  # the large lane keeps its own count and rate
            large.expect(1_000_000, True, 10.0)
    finally:
        for ctx in held:
            ctx.__exit__(None, None, None)
    assert b.waiting_mp == {"batch": 0.0, "large": 0.0} and b.admitted == 0
    with b.slot() as again:
        again.expect(1_000_000, False, 10.0)  # the work ahead left: admitted
    assert ADMIT_SHARE < 1
