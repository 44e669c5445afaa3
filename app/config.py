"""Settings: every knob of the service, read from the environment (or `.env`), with its default.

`.env.example` lists the same settings; keep the two in step.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me"
DEV_DEMO_CLIENT_SECRET = "demo-secret"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    instance_id: str = ""  # defaults to hostname:pid

    broadcast_url: str = "memory://"
    database_url: str = "sqlite+aiosqlite:///./pricefeed.db"
    # PostgreSQL: the longest a connection attempt or a query may take before it counts as
    # the database being down (the token endpoint then answers 503)
    database_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    redis_key_prefix: str = "pricefeed"

    jwt_secret: str = DEV_JWT_SECRET
    jwt_audience: str = "pricefeed"
    jwt_ttl_seconds: int = Field(default=900, ge=30, le=86400)
    jwt_leeway_seconds: int = Field(default=5, ge=0, le=60)
    # An external issuer's tokens (RS256 or ES256, by key type): its public key as a PEM file
    # and/or a JWK Set file, and the `iss` its tokens must carry (required with either file).
    jwt_public_key_file: str = ""
    jwt_jwks_file: str = ""
    jwt_issuer: str = ""
    # Revoked tokens (`python -m app.admin revoke`): each instance reads the list this often,
    # and closes the streams of newly revoked tokens with 4401.
    revocation_poll_seconds: float = Field(default=2.0, gt=0, le=60)
    # Instruments added or disabled (`python -m app.admin add-instrument`, `disable-instrument`):
    # every server and producer reads the active ones this often (2: seen within 5 s).
    instrument_poll_seconds: float = Field(default=2.0, gt=0, le=60)

    # The demo client, seeded in dev only; ignored in prod.
    demo_client_id: str = "demo"
    demo_client_secret: str = DEV_DEMO_CLIENT_SECRET

    allowed_origins: Annotated[list[str], NoDecode] = []

    # Operator pages: unset METRICS_TOKEN leaves /metrics open; DOCS_PUBLIC=false hides the
    # API docs and the schema (404).
    metrics_token: str = ""
    docs_public: bool = True

    producer: Literal["on", "off"] = "on"
    # Where prices come from (app/feed/sources/); pushed quotes (POST /v1/ingest) go out
    # whatever the source, and `ingest` is only them.
    feed_source: Literal["simulated", "replay", "coinbase", "ingest"] = "simulated"
    feed_ticks_per_second: float = Field(default=2.0, gt=0, le=1000)
    feed_seed: int | None = None
    feed_replay_path: str = ""
    feed_replay_speed: float = Field(default=1.0, ge=0, le=1_000_000)  # 0: as fast as taken
    feed_replay_loop: bool = False
    feed_upstream_url: str = "wss://ws-feed.exchange.coinbase.com"
    # A source silent this long is reconnected; /readyz reports the feed `stale` past it.
    feed_stale_seconds: float = Field(default=10.0, gt=0, le=3600)
    leader_lease_ms: int = Field(default=3000, ge=500, le=60000)
    # POST /v1/ingest: accepted batches not yet published (the inbox, app/feed/inbox.py) past
    # which a push waits up to INGEST_WAIT_SECONDS for room, then gets 503 with Retry-After;
    # and the largest request body it reads (413 past it; 1,000 quotes fit in ~250 KB).
    ingest_max_pending_batches: int = Field(default=1000, ge=1, le=1_000_000)
    ingest_wait_seconds: float = Field(default=2.0, ge=0, le=60)
    ingest_max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)

    retention_ticks: int = Field(default=1000, ge=10, le=1_000_000)
    candles_kept: int = Field(default=500, ge=1, le=100_000)
    # History in the database (app/history/): days of ticks and candles kept (0: none written),
    # and the published ticks the leader holds while the database is slow or down; past it
    # the oldest are dropped and counted (200,000: over three minutes at 1,000 ticks/s, ~70 MB).
    history_days: int = Field(default=7, ge=0, le=3650)
    history_buffer_ticks: int = Field(default=200_000, ge=1000, le=10_000_000)

    fanout_max_lag_ms: int = Field(default=50, ge=0)
    fanout_direct_writes: bool = True
    ws_max_message_bytes: int = Field(default=16 * 1024, ge=512)
    ws_max_messages_per_second: float = Field(default=20.0, gt=0)
    ws_max_subscriptions: int = Field(default=100, ge=1, le=10_000)
    ws_max_connections: int = Field(default=10_000, ge=1)
    ws_max_connections_per_subject: int = Field(default=50, ge=1)
    # With Redis, each stream's lease in the per-subject count across instances: renewed every
    # third of it, so a dead instance's streams stop counting within it (app/prices/leases.py).
    stream_lease_seconds: float = Field(default=15.0, ge=1, le=300)
    ws_heartbeat_seconds: float = Field(default=15.0, gt=0)
    ws_send_timeout_seconds: float = Field(default=10.0, gt=0)
    ws_subscribe_timeout_seconds: float = Field(default=30.0, gt=0)  # /v1/ws: subscribe by then
    ws_outbox_frames: int = Field(default=512, ge=16)
    ws_send_buffer_bytes: int = Field(default=131_072, ge=0)  # kernel send buffer; 0 = autotune
    ws_per_message_deflate: bool = False
    # Before the app: a request head not complete this long after the connection (or the first
    # byte of a keep-alive connection's next request) is answered 408; a WebSocket handshake's
    # request too. And open connections per instance past which requests are answered 503
    # (not /healthz); 0: WS_MAX_CONNECTIONS + 1,000, room for REST and probes beside the streams.
    ws_handshake_timeout_seconds: float = Field(default=10.0, gt=0)
    max_open_connections: int = Field(default=0, ge=0)
    # `since` resumes (WS `since`, SSE Last-Event-ID): retained ticks one resume may replay,
    # and a token subject's resumes a minute on this instance; past them, a snapshot
    # instead (app/prices/replays.py).
    ws_replay_ticks_per_subscribe: int = Field(default=1000, ge=0)
    ws_replay_ticks_per_minute: int = Field(default=20_000, ge=0)
    # REST: a token bucket per token subject (before auth, per client address), shared by
    # every instance through Redis; past it, 429 with Retry-After (app/ratelimit.py).
    rest_rate_per_second: float = Field(default=50.0, gt=0)
    rest_rate_burst: int = Field(default=100, ge=1)
    # The token endpoint: requests per client address and per client_id (429 past them), and
    # scrypt checks run at once per process (503 when one waits longer than the wait).
    token_rate_per_minute: float = Field(default=30.0, gt=0)
    token_rate_burst: int = Field(default=10, ge=1)
    token_max_concurrent_checks: int = Field(default=4, ge=1)
    token_check_wait_seconds: float = Field(default=1.0, gt=0, le=30)
    ws_impl: Literal["fast", "websockets-sansio", "wsproto", "websockets"] = "fast"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        return value

    @model_validator(mode="after")
    def _workers_need_redis(self) -> Settings:
        if self.workers > 1 and not self.uses_redis:
            raise ValueError("WORKERS > 1 needs BROADCAST_URL=redis://… (memory:// is one process)")
        return self

    @model_validator(mode="after")
    def _replay_needs_a_file(self) -> Settings:
        if self.feed_source == "replay" and not self.feed_replay_path:
            raise ValueError("FEED_SOURCE=replay needs FEED_REPLAY_PATH (a CSV file)")
        return self

    @model_validator(mode="after")
    def _external_keys_need_issuer(self) -> Settings:
        if (self.jwt_public_key_file or self.jwt_jwks_file) and not self.jwt_issuer:
            raise ValueError("JWT_PUBLIC_KEY_FILE / JWT_JWKS_FILE need JWT_ISSUER")
        return self

    @model_validator(mode="after")
    def _refuse_dev_secrets_in_prod(self) -> Settings:
        # Not DEMO_CLIENT_SECRET: prod seeds no demo client (app/main.py), so its secret opens
        # nothing there, and a strong JWT_SECRET alone starts prod.
        if self.env == "prod" and (self.jwt_secret == DEV_JWT_SECRET or len(self.jwt_secret) < 32):
            raise ValueError("ENV=prod needs JWT_SECRET set to a random value of 32+ chars")
        return self

    @property
    def open_connection_cap(self) -> int:
        """`MAX_OPEN_CONNECTIONS`, or its default beside `WS_MAX_CONNECTIONS`."""
        return self.max_open_connections or self.ws_max_connections + 1_000

    @property
    def uses_redis(self) -> bool:
        return self.broadcast_url.startswith(("redis://", "rediss://"))


@lru_cache
def get_settings() -> Settings:
    return Settings()
