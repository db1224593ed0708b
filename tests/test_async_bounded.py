"""Every asynchronous test is bounded by a timeout: a lost request must fail the fast tier, not hang
it (one batcher test once had no timeout). Checked in the test sources themselves."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_event_loop_a_test_runs_is_bounded_by_wait_for():
    unbounded = []
    for path in sorted(TESTS.rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"asyncio\.run\(\s*(?!asyncio\.wait_for\()", text):
            line = text.count("\n", 0, match.start()) + 1
            unbounded.append(f"{path.relative_to(TESTS)}:{line}")
        for match in re.finditer(r"^\s*async def test_|run_until_complete\(|mark\.asyncio", text, flags=re.M):
            line = text.count("\n", 0, match.start()) + 1
            unbounded.append(f"{path.relative_to(TESTS)}:{line} (run the coroutine with asyncio.run)")
    assert not unbounded, ("run coroutines as asyncio.run(asyncio.wait_for(coro, seconds)): "
                           + ", ".join(unbounded))
