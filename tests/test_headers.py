from __future__ import annotations

import pytest

from ratelimitd.engine.outcomes import go_duration


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0s"), (6, "6ms"), (999, "999ms"), (1000, "1s"), (7660, "7.66s"), (179_560, "2m59.56s"),
     (60_000, "1m0s"), (3_600_000, "1h0m0s"), (86_400_000, "24h0m0s"), (3_723_004, "1h2m3.004s")],
)  # fmt: skip
def test_go_duration_matches_go(ms: int, text: str) -> None:
    assert go_duration(ms) == text
