"""The soak, small enough for CI: 100 concurrent sessions through a real gateway process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import soak


@pytest.mark.timeout(300)
async def test_hundred_concurrent_sessions_lose_nothing_and_leak_nothing(tmp_path: Path) -> None:
    report = await soak(100, 6.0, log=tmp_path / "gateway.log")
    print("\n".join(report.lines()))
    assert report.sessions >= 100
    assert not report.mismatches, report.mismatches[:5]
    assert not report.errors, report.errors
    assert report.fds_after <= report.fds_before
    assert report.ok
