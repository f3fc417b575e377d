"""`python -m services.scheduler`: run one scheduler process (settings from NNFABRIC_* env)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import Store
from .scheduler import Scheduler, ray_dispatch


class _BusyReplicaProbe(logging.Filter):
    """Drops Serve's "failed to get queue length" warning: a replica busy with a forward pass
    answers the router's probe late, which is expected (it runs one batch at a time)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to get queue length")


log = logging.getLogger("nnfabric.scheduler")


async def connect(attempt: Callable[[], object], stopping: asyncio.Event, first_wait_s: float = 1.0,
                  longest_wait_s: float = 15.0) -> bool:  # fmt: skip
    """Call `attempt` (connect to Ray) until it succeeds or `stopping` is set, waiting longer
    after each failure. Nothing else runs meanwhile: no heartbeat, so /readyz says no scheduler
    holds Ray. True once connected."""
    wait = first_wait_s
    tries = 0
    while not stopping.is_set():
        tries += 1
        try:
            attempt()
            if tries > 1:
                log.info("connected to Ray after %d attempts", tries)
            return True
        except Exception as exc:  # Ray raises many types here (ConnectionError, RuntimeError, gRPC errors)
            log.warning("cannot reach Ray (%s: %s); retrying in %.0f s", type(exc).__name__, str(exc)[:200], wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait)
        wait = min(wait * 2, longest_wait_s)
    return False


async def main() -> None:
    import ray

    settings = Settings()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    def attempt() -> None:
        if ray.is_initialized():
            ray.shutdown()  # a half-made connection from the last attempt
        ray.init(address=None if settings.ray_address == "local" else settings.ray_address,
                 namespace=settings.ray_namespace, include_dashboard=False, log_to_driver=False)  # fmt: skip

    if not await connect(attempt, stopping):
        return
    logging.getLogger("ray.serve").addFilter(_BusyReplicaProbe())
    store = Store.from_url(settings.redis_url, settings.result_ttl_s)
    scheduler = Scheduler(store, Catalog.load(settings.catalog), ray_dispatch(), settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scheduler.stop)
    await scheduler.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
