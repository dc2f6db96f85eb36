"""The OpenAPI document is true: schemathesis fuzzes every operation of the real app (real SQLite) with
valid and invalid requests, and checks each answer's status code, content type, headers and body
against the document; then it reads back seeded resources (dataset, job, model, report) the same way.

Operations that would load a model fail fast here (no such model or dataset), so nothing trains or loads.
Deterministic (derandomize) and small (a few examples per operation), as it runs in `make test`.
(`schemathesis.pytest.from_fixture` does not run on pytest 9, hence the strategies with `@given`.)
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode, checks
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi import checks as openapi_checks

from app.core.config import Settings
from app.core.db import session_scope
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.main import create_app
from app.ml.eval.files import write_report
from app.ml.eval.metrics import build_report
from app.ml.eval.plots import plot_loss_curve
from app.services import jobs as job_service
from app.services import reports as report_service
from app.services.models import register_adapter
from tests.conftest import upload

CONTRACT_CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.negative_data_rejection,
]
FUZZ = hypothesis_settings(max_examples=25, deadline=None, derandomize=True, database=None,
                           suppress_health_check=list(HealthCheck))
_PATHS = create_app(Settings(api_key=None)).openapi()["paths"]
OPERATIONS = [(method.upper(), path) for path, item in _PATHS.items() for method in item]


def _can_be_invalid(definition: dict) -> bool:
    """Whether an invalid request exists: a body, or a parameter that is more than any string."""
    return "requestBody" in definition or any(
        set(param.get("schema", {})) - {"type", "title", "description"} or param["schema"].get("type") != "string"
        for param in definition.get("parameters", []))


FUZZ_RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if _can_be_invalid(_PATHS[p][m.lower()])]
LABELS = LabelSet.from_pairs([(0, "办理取消"), (1, "办理开通")])


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A real app on a real SQLite file, with one of each resource, and its OpenAPI schema."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("contract") / "data", default_base_model="tiny-glm4",
                        default_config="tiny_test", api_key=None)
    app = create_app(settings)
    seeded = {}
    with TestClient(app) as client:
        csv = "sentence_sep,c_numerical,label_raw\n您好[SEP]取消彩铃,0,办理取消\n您好[SEP]开通流量,1,办理开通\n"
        seeded["dataset_id"] = upload(client, csv.encode()).json()["id"]
        seeded["job_id"] = client.post("/jobs", json={"dataset_id": seeded["dataset_id"]}).json()["id"]
    adapter_dir = settings.data_dir / "adapters" / "ft_contract"
    adapter_dir.mkdir(parents=True)
    plot_loss_curve([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], adapter_dir / "loss_curve.png")
    report = build_report(y_true=[0, 1], y_pred=[0, 0], label_set=LABELS, texts=["a", "b"],
                          raw_outputs=[None, None], elapsed_seconds=1.0, mode="score", confidences=[0.9, 0.6])
    with session_scope(settings) as session:
        register_adapter(session, settings, model_id="ft_contract", name="contract", base_model="tiny-glm4",
                         adapter_dir=adapter_dir, label_set=LABELS.to_pairs(), max_input_length=None,
                         system_prompt=build_system_prompt(LABELS), quantization="none")
        report_id, report_dir = report_service.new_report_dir(settings)
        write_report(report, report_dir)
        report_service.record_report(session, settings, report_id=report_id, report_dir=report_dir, report=report,
                                     model_id="ft_contract", dataset_id=seeded["dataset_id"], job_id=None)
    with session_scope(settings) as session:
        evaluation = job_service.create_evaluation_job(session, settings, model="ft_contract",
                                                       dataset_id=seeded["dataset_id"], mode="score")
    seeded.update(model_id="ft_contract", report_id=report_id, evaluation_id=evaluation.id)
    yield schemathesis.openapi.from_asgi("/openapi.json", app), seeded
    shutdown_lifespans()


@pytest.mark.parametrize("method,path,mode", FUZZ_RUNS, ids=[f"{m} {p} {mode.value}" for m, p, mode in FUZZ_RUNS])
def test_every_answer_matches_the_openapi_document(api, method, path, mode):
    schema, _ = api
    operation = schema[path][method]
    # No worker runs here, so readiness answers its documented 503; every other 5xx is a defect.
    contract = CONTRACT_CHECKS[1:] if path == "/health/ready" else CONTRACT_CHECKS

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        case.call_and_validate(checks=contract)

    check()


@pytest.mark.parametrize("method,path", [(m, p) for m, p in OPERATIONS if "{" in p])
def test_existing_resources_are_answered_as_documented(api, method, path):
    schema, seeded = api
    ids = {**seeded, "job_id": seeded["evaluation_id"]} if path.startswith("/evaluations/") else seeded
    case = schema[path][method].Case(
        path_parameters={name: value for name, value in ids.items() if "{" + name + "}" in path})
    expected = {"GET": [200], "DELETE": [409], "POST": [200, 409]}[method]  # the job uses the dataset; cancel twice
    for status in expected:
        response = case.call_and_validate(checks=CONTRACT_CHECKS)
        assert response.status_code == status, response.text


def test_with_an_api_key_every_protected_operation_answers_a_documented_401(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data", api_key="s3cret"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        public = {"/health", "/health/ready"}  # liveness and readiness probes carry no key
        protected = [(m, p) for m, p in OPERATIONS if p not in public]
        for method, path in protected:
            operation = schema[path][method]
            assert operation.definition.raw.get("security"), f"{method} {path} declares no security"
            parameters = {param.name: "x" for param in operation.path_parameters} or None
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                case = operation.Case(path_parameters=parameters, headers=headers)
                response = case.call_and_validate(checks=CONTRACT_CHECKS[:-1])
                assert response.status_code == 401, f"{method} {path}: {response.status_code}"
                assert response.json()["detail"]["message"]
        assert not any(schema[path]["GET"].definition.raw.get("security") for path in public)
    finally:
        shutdown_lifespans()
