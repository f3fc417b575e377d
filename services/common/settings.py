"""Every service's settings, read from the environment (prefix NNFABRIC_). One source of truth.

settings = Settings()              # NNFABRIC_REDIS_URL, NNFABRIC_CATALOG, ...
"""

from __future__ import annotations

from nnfabric.graph.validate import Limits
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NNFABRIC_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Where the one-machine fabric (`nnfabric-server serve`) keeps its own Redis's append-only
    # file when no NNFABRIC_REDIS_URL is given: jobs, keys and results survive a restart.
    redis_data_dir: str = "~/.local/share/nnfabric/redis"
    catalog: str = "catalog.yaml"
    # How long payloads, results and event streams are kept after a job ends.
    result_ttl_s: int = 24 * 3600
    # A request body over this is refused (413) before it is parsed.
    max_envelope_bytes: int = Limits().max_envelope_bytes
    max_batch_jobs: int = 1024  # jobs in one POST /v1/jobs/batch
    # Results up to this size follow the `completed` event on the events websocket when the client
    # asks (`?result=inline`), saving it a request; larger ones are fetched from /result.
    inline_result_bytes: int = 4 << 20
    # How long the high-level routes (activations, completions) wait for their job before they
    # answer 202 with the job to follow.
    compiled_wait_s: float = 120.0
    # A job waiting longer than this in the queue fails instead of running late.
    queue_timeout_s: float = 3600.0
    # Ray: "auto" joins a running cluster; "local" starts one in-process.
    ray_address: str = "local"
    ray_namespace: str = "nnfabric"
    # Peers whose X-Forwarded-For the api believes (comma-separated addresses or networks, e.g.
    # the ingress controller's pod range): behind them, the client address that failed
    # authentications are counted against is the one the proxy saw. Empty: trust no header.
    trusted_proxies: str = ""
    # An event websocket opened while its key's streams are all in use waits this long for one
    # to be given back (a client that closes a stream and opens the next at once) before 4429.
    stream_slot_wait_s: float = 5.0
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    scheduler_name: str = "scheduler-0"
    # A replica gives up on a batch this long after its jobs' time limits have all passed (a
    # native op cannot be interrupted): the stuck job fails and Serve replaces the replica.
    watchdog_margin_s: float = 30.0
    # Entries another scheduler read but left unacknowledged this long are taken over (a dead
    # scheduler's are taken over sooner, as soon as its heartbeat lapses).
    reclaim_idle_ms: int = 30_000
    # Results from this size up are written to the result store (a directory; in a cluster a
    # volume the replicas and the api share) instead of Redis; the api streams them with Range.
    result_store_dir: str = "~/.cache/nnfabric/results"
    result_store_min_bytes: int = 4 << 20
    # While Redis cannot be reached, a replica keeps the outcomes of the jobs it finished (they
    # are recorded the moment Redis answers, exactly once). Past this many bytes of results held
    # in memory it writes further ones to the result store; where there is none (result_store_min_bytes
    # at its maximum: no shared volume), it gives those jobs back to run again, as if it had died.
    outcome_buffer_bytes: int = 512 << 20
    # Once every replica of a model has a batch running, a batch that is not full waits up to this
    # long for more jobs (it goes at once when full or when a batch ends): jobs from clients that
    # send their next job when the last one ends then share a pass. The replica's second slot is
    # still filled, only this much later.
    batch_hold_ms: float = 20.0
    # Generate jobs share one generation that later jobs join at its next step and finished
    # ones leave (services/worker/generation.py). Off: they merge only with jobs of one batch
    # and one prompt length, in one Hugging Face `generate` (the behaviour before; a baseline).
    continuous_batching: bool = True
    # A dispatch counts as lost this long after the replica's own watchdog should have answered.
    dispatch_grace_s: float = 15.0
    # The status page's history: every this many seconds one process (whichever scheduler takes the
    # turn in Redis) records each model's queue depth, throughput, waits, batch sizes and replicas.
    history_interval_s: float = 10.0
    # How far back the history reaches; at most HISTORY_MAX_SAMPLES samples per model are kept
    # whatever the interval, so Redis's memory for it stays bounded.
    history_s: float = 3600.0
    # Where converted models (GGUF -> safetensors) are kept; a shared volume in a cluster.
    cache_dir: str = "~/.cache/nnfabric"

    @property
    def has_result_store(self) -> bool:
        """Whether large results go to a result store the api can read (a shared volume)."""
        return self.result_store_min_bytes < 2**63 - 1
