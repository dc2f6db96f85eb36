"""POST /jobs racing DELETE /datasets answers 404/409, never a 500 from the foreign key; event ids past
SQLite's 64-bit range are a 422 (issue 9, item 4)."""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import event

from app.core.db import get_engine, session_factory
from tests.conftest import upload


def _dataset(client) -> str:
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    return upload(client, to_cmcc_csv(generate_sample_dialogues(per_label=2, seed=3)).encode()).json()["id"]


@contextmanager
def _just_before(settings, statement_prefix: str, interleave):
    """Run ``interleave()`` (its own session: another request) right before the first statement starting
    with ``statement_prefix`` reaches the database: the interleaving of two requests, built deterministically."""
    engine = get_engine(settings)
    fired = []

    def hook(conn, cursor, statement, parameters, context, executemany):
        if not fired and statement.lstrip().upper().startswith(statement_prefix):
            fired.append(statement)
            interleave()

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def test_a_job_created_while_its_dataset_is_deleted_is_a_404(client, settings):
    from app.services.datasets import delete_dataset

    dataset_id = _dataset(client)

    def delete_meanwhile():
        with session_factory(settings)() as other:
            delete_dataset(other, settings, dataset_id)  # no job yet: the delete goes through

    with _just_before(settings, "INSERT INTO JOBS", delete_meanwhile) as fired:
        response = client.post("/jobs", json={"dataset_id": dataset_id})
    assert fired
    assert response.status_code == 404, response.text
    assert dataset_id in response.json()["detail"]["message"]
    assert client.get("/jobs").json() == []
    assert client.get(f"/datasets/{dataset_id}").status_code == 404


def test_an_evaluation_created_while_its_dataset_is_deleted_is_a_404(client, settings):
    from app.services.datasets import delete_dataset

    dataset_id = _dataset(client)

    def delete_meanwhile():
        with session_factory(settings)() as other:
            delete_dataset(other, settings, dataset_id)

    with _just_before(settings, "INSERT INTO JOBS", delete_meanwhile) as fired:
        response = client.post("/evaluations", json={"model": "tiny-glm4", "dataset_id": dataset_id})
    assert fired and response.status_code == 404, response.text


def test_a_dataset_deleted_while_a_job_on_it_is_created_is_a_409(client, settings):
    from app.services.jobs import create_training_job

    dataset_id = _dataset(client)
    created = []

    def create_job_meanwhile():
        with session_factory(settings)() as other:
            created.append(create_training_job(other, settings, dataset_id=dataset_id, validation_dataset_id=None,
                                               base_model=None, config=None, hyperparameters=None).id)

    with _just_before(settings, "DELETE FROM DATASETS", create_job_meanwhile) as fired:
        response = client.delete(f"/datasets/{dataset_id}")
    assert fired and created
    assert response.status_code == 409, response.text
    assert created[0] in response.json()["detail"]["message"]
    assert client.get(f"/datasets/{dataset_id}").status_code == 200
    assert (settings.datasets_dir / dataset_id / "records.jsonl").is_file()
    assert [j["id"] for j in client.get("/jobs").json()] == created


def test_deleting_a_dataset_twice_at_once_is_a_404_for_the_second(client, settings):
    from app.services.datasets import delete_dataset

    dataset_id = _dataset(client)

    def delete_meanwhile():
        with session_factory(settings)() as other:
            delete_dataset(other, settings, dataset_id)

    with _just_before(settings, "DELETE FROM DATASETS", delete_meanwhile):
        response = client.delete(f"/datasets/{dataset_id}")
    assert response.status_code == 404, response.text


def test_event_ids_past_64_bits_are_a_422(client):
    job_id = client.post("/jobs", json={"dataset_id": _dataset(client)}).json()["id"]
    assert client.get(f"/jobs/{job_id}/events", params={"after_id": 2**63 - 1}).json() == []
    for after_id in (2**63, 10**30, -1):
        response = client.get(f"/jobs/{job_id}/events", params={"after_id": after_id})
        assert response.status_code == 422, (after_id, response.text)
