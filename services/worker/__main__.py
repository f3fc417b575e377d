"""`python -m services.worker`: join a running Ray cluster and deploy the catalog's models on it
(docker-compose's worker; on Kubernetes KubeRay's RayService does this from its serve config)."""

from __future__ import annotations

import logging
import signal
import threading

from ..common.catalog import Catalog
from ..common.settings import Settings
from .deployment import deploy_catalog


def main() -> None:
    import ray

    settings = Settings()
    ray.init(address=settings.ray_address, namespace=settings.ray_namespace, include_dashboard=False)
    deploy_catalog(Catalog.load(settings.catalog), settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
