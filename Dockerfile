# pricefeed: slim, non-root; migrates, then serves.
FROM python:3.12-slim AS build
WORKDIR /src
# A C compiler for the fan-out's send loop (app/prices/_fanout.c); the final image has none.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# Exact, hashed versions (make lock writes them): a new release upstream changes no image.
# The dependencies first, so this layer is cached until a lock changes.
COPY requirements/lock.txt requirements/build.lock.txt ./requirements/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --require-hashes \
    -r requirements/lock.txt -r requirements/build.lock.txt
COPY pyproject.toml README.md ./
COPY clients/python ./clients/python
COPY app ./app
# The JavaScript client the service serves: app/prices/static/pricefeed.js links to it, and the
# wheel carries it as a file.
COPY clients/js/pricefeed.js ./clients/js/pricefeed.js
# The project and its SDK (clients/python), built by the locked setuptools rather than one
# fetched for the build; the SDK comes from this repo, never from an index.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation ./clients/python . \
    && cd / && /opt/venv/bin/python -c "import app.prices._fanout"  # built, not skipped

FROM python:3.12-slim
# ENV=prod unless told otherwise: no demo client, and a strong JWT_SECRET is required.
ENV ENV=prod \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite+aiosqlite:////data/pricefeed.db
RUN useradd --system --uid 10001 --home /app pricefeed && mkdir -p /data && chown pricefeed /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=pricefeed alembic.ini ./
COPY --chown=pricefeed alembic ./alembic
# A few minutes of a few symbols: FEED_SOURCE=replay FEED_REPLAY_PATH=samples/ticks.csv
COPY --chown=pricefeed samples ./samples
USER pricefeed
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8000\")}/healthz', timeout=2)"
CMD ["sh", "-c", "alembic upgrade head && exec python -m app"]
