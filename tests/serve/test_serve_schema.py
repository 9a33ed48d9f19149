"""A schemathesis run against the service's own /openapi.json, in process: generated requests for
every operation (valid and invalid), checked for 5xx answers and for responses that break the
schema. Bounded: a fixed number of examples per operation (twelve times more in the slow tier),
no shrinking."""

import pytest
import schemathesis  # in the test extra: a missing one fails here, it does not skip
from hypothesis import HealthCheck, Phase, given, settings

from phitune.serve.app import create_app
from phitune.serve.settings import Settings

EXAMPLES = 25


@pytest.fixture(scope="module")
def app(tiny_phi3, tmp_path_factory):
    """The app holding a file and a job, so that list pages return real objects to check."""
    from fastapi.testclient import TestClient

    settings = Settings(
        storage=tmp_path_factory.mktemp("schema"),
        models={"tiny": str(tiny_phi3)},
        max_upload_bytes=64 * 1024,
        allowed_hosts=["testserver"],  # the in-process clients' Host: a keyless server answers its own names only
    )
    app = create_app(settings)
    client = TestClient(app)
    row = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    f = client.post("/v1/files", files={"file": ("t.jsonl", row * 4)}, data={"purpose": "fine-tune"}).json()
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny", "training_file": f["id"], "metadata": {"a": "b"}, "method": {"type": "dpo"}},
    )
    assert job.status_code == 200, job.text
    return app


@pytest.fixture(scope="module")
def schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
)


def test_no_5xx_and_no_schema_violation(schema):
    _check(schema, EXAMPLES)


@pytest.mark.slow
def test_no_5xx_with_many_more_examples(schema):
    """The slow tier: twelve times the examples per operation (hostile values reach deeper)."""
    _check(schema, EXAMPLES * 12)


def _check(schema, examples: int) -> None:
    from schemathesis import checks as available

    checks = [getattr(available, name) for name in CHECKS]
    failures = []
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 17
    for operation in operations:
        strategy = operation.as_strategy()

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def run(case):
            try:
                case.call_and_validate(checks=checks)
            except Exception as exc:  # noqa: BLE001 - collected, reported together
                failures.append(f"{operation.label}: {str(exc)[:400]}")
                raise

        try:
            run()
        except Exception:  # noqa: BLE001
            pass
    assert not failures, "\n".join(failures[:10])
