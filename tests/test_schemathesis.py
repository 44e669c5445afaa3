"""schemathesis against `/openapi.json`: every REST route, with schema-generated (and
schema-breaking) requests and a valid bearer token, answers no 5xx and what its schema says.

The app runs in process over ASGI (schemathesis runs its lifespan); the rate limits are raised
so that the fuzzer meets the routes, not the 429s (tests/test_ratelimit.py covers those).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from tests.support import make_settings, token

# schemathesis's pytest integration reads the schema at collection time (its from_fixture does
# not run on this pytest); the app is built then, and its database filled before the test runs.
DATABASE = Path(tempfile.mkdtemp(prefix="pricefeed-schemathesis-")) / "pricefeed.db"
atexit.register(shutil.rmtree, DATABASE.parent, ignore_errors=True)
APP = create_app(
    make_settings(
        f"sqlite+aiosqlite:///{DATABASE}",
        feed_ticks_per_second=2,
        rest_rate_per_second=100_000,
        rest_rate_burst=100_000,
        token_rate_per_minute=1_000_000,
        token_rate_burst=100_000,
        token_check_wait_seconds=30,
    )
)
# The schema /openapi.json serves (tests/test_docs.py: the same); the app answers over ASGI,
# its lifespan run by schemathesis around the test.
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP
schema.location = "/openapi.json"


@pytest.fixture(scope="module", autouse=True)
def database(migrated_db_template: Path) -> None:
    shutil.copy(migrated_db_template, DATABASE)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_route_answers_no_5xx_and_matches_its_schema(case: Any) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {token()}"},
        checks=[
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
            content_type_conformance,
        ],
    )
