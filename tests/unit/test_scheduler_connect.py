"""The scheduler's connection to Ray is retried with growing waits until it works (no Ray, no Redis)."""

from __future__ import annotations

import asyncio
import time

MODEL = "tiny"


def test_connecting_to_ray_is_retried_with_growing_waits_until_it_works():
    from services.scheduler.__main__ import connect

    calls: list[float] = []

    def flaky() -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("ray client connection timeout")

    async def scenario() -> bool:
        return await connect(flaky, asyncio.Event(), first_wait_s=0.05, longest_wait_s=1.0)

    assert asyncio.run(scenario()) is True
    assert len(calls) == 3 and calls[2] - calls[1] > calls[1] - calls[0]  # the second wait is longer

    async def stopped() -> bool:
        stop = asyncio.Event()
        stop.set()
        return await connect(flaky, stop)

    assert asyncio.run(stopped()) is False
