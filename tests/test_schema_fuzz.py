"""Schema-driven fuzzing of the live API: whatever schemathesis derives from the service's
OpenAPI description (valid bodies, and deliberately invalid ones) never gets a 5xx.

    .venv/bin/python -m pytest -m slow tests/test_schema_fuzz.py -q

The OpenAPI document is the one BentoML generates for the service (`Digits.openapi_spec`, what
its /docs.json would serve). The live server does not serve it: BentoML registers /docs.json
after mounted ASGI apps, so the page mounted at "/" answers that path with 404, and /schema.json
is BentoML's own, non-OpenAPI format. The requests all go to the real `bentoml serve`.

Three checks hold the service's own behaviour: no 5xx (`not_a_server_error`), requests that
break the schema are refused with a 4xx (`negative_data_rejection`), and undocumented methods
get 405 (`unsupported_method`). The others are left out because they would test BentoML's
generated document rather than the service: it lists only 200/400/404/500 with BentoML's error
bodies, while the service refuses bad input with 405/413/415/422 and `{"error", "reason"}` on
purpose (service/errors.py), and it calls any string a valid `image` although most strings are
not images. The run is bounded: MAX_EXAMPLES generated requests per operation plus
schemathesis's coverage cases, no shrinking, derandomized so that every run sends the same
requests (about 300, in a few seconds).
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection, unsupported_method

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 50  # generated requests per operation
REQUEST_TIMEOUT = 10.0  # seconds; the service's own timeout answers 504 before this


def openapi_document() -> dict:
    from service.service import Digits

    # Through JSON so that status codes become strings, as in a served document.
    return json.loads(json.dumps(Digits.openapi_spec.asdict()))


# The schema is built at collection, from the service's code alone; only the requests need the
# server, so the test takes `live_service` and sends each case there. (A fixture-based schema,
# `schemathesis.pytest.from_fixture`, fails with pytest 9.2: it sets `Function._nodeid`, which
# pytest no longer has.)
schema = schemathesis.openapi.from_dict(
    openapi_document(),
    config=schemathesis.Config.from_dict(
        {
            "request-timeout": REQUEST_TIMEOUT,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "no-shrink": True,
                "deterministic": True,
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
        }
    ),
)


CHECKS = [not_a_server_error, negative_data_rejection, unsupported_method]


def test_every_api_route_is_fuzzed() -> None:
    assert {"/predict", "/predict_batch", "/read", "/feedback"} <= set(openapi_document()["paths"])


@schema.parametrize()
def test_generated_requests_never_get_a_server_error(
    case: schemathesis.Case, live_service: str
) -> None:
    case.call_and_validate(base_url=live_service, checks=CHECKS)
