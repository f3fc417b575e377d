"""`python -m services.scheduler`: run one scheduler process (settings from NNFABRIC_* env)."""

from __future__ import annotations

import asyncio
import logging
import signal

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import Store
from .scheduler import Scheduler, ray_dispatch


class _BusyReplicaProbe(logging.Filter):
    """Drops Serve's "failed to get queue length" warning: a replica busy with a forward pass
    answers the router's probe late, which is expected (it runs one batch at a time)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to get queue length")


async def main() -> None:
    import ray

    settings = Settings()
    ray.init(address=None if settings.ray_address == "local" else settings.ray_address,
             namespace=settings.ray_namespace, include_dashboard=False, log_to_driver=False)  # fmt: skip
    logging.getLogger("ray.serve").addFilter(_BusyReplicaProbe())
    store = Store.from_url(settings.redis_url, settings.result_ttl_s)
    scheduler = Scheduler(store, Catalog.load(settings.catalog), ray_dispatch(), settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scheduler.stop)
    await scheduler.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
