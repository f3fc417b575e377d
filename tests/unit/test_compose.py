"""docker-compose.yml is valid (Debian's docker-compose validates with no engine) and uses the
Dockerfile's targets and the settings the services read."""

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_validates_and_matches_the_images_and_settings():
    import os

    compose = ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "NNFABRIC_RAY_TOKEN"}
    refused = subprocess.run(compose, capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "NNFABRIC_RAY_TOKEN" in refused.stderr  # Ray never runs unauthenticated
    done = subprocess.run(compose, capture_output=True, text=True, env={**env, "NNFABRIC_RAY_TOKEN": "t" * 48})
    assert done.returncode == 0, done.stderr
    from services.common.settings import Settings

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "ray-head", "worker", "scheduler", "api"} <= set(services)
    targets = {s["build"]["target"] for s in services.values() if "build" in s}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert targets == {"control", "worker"} and all(f" AS {t}" in dockerfile for t in targets)
    fields = {f"NNFABRIC_{name.upper()}" for name in Settings.model_fields}
    for name, service in services.items():
        env = set(service.get("environment", {}))
        assert {e for e in env if e.startswith("NNFABRIC_")} <= fields, name
