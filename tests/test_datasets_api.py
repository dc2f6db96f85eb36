"""POST/GET/DELETE /datasets on a real app + SQLite file: every format, every bad-input case."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text

from app.domain.cmcc34 import CMCC34_LABELS
from app.domain.prompt import build_system_prompt, format_answer
from tests.conftest import upload


def _stored_state(settings):
    engine = create_engine(settings.sqlalchemy_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT COUNT(*) FROM datasets")).scalar()
    engine.dispose()
    files = [p for p in settings.datasets_dir.iterdir()] if settings.datasets_dir.exists() else []
    return rows, files


def test_cmcc_csv_with_bom_is_parsed_and_stored(client, settings, sample_csv):
    response = upload(client, b"\xef\xbb\xbf" + sample_csv, "train.csv", name="demo")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "cmcc_csv"
    assert body["n_rows"] == 68 and body["n_labels"] == 34
    assert {lab["count"] for lab in body["labels"]} == {2}
    assert body["stats"]["imbalance"] == {"min_per_class": 2, "max_per_class": 2, "ratio_max_min": 1.0,
                                          "classes_without_rows": []}
    assert "7：办理开通" in body["system_prompt"] and "意图：{编号}：{意图名称}" in body["system_prompt"]
    stored = settings.datasets_dir / body["id"]
    assert (stored / "original.csv").read_bytes().endswith(sample_csv)
    records = [json.loads(line) for line in (stored / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 68 and "[SEP]" in records[0]["dialogue"]
    # the prompt is stored once, on the dataset, not per row
    assert "system_prompt" not in records[0]
    assert client.get(f"/datasets/{body['id']}").json()["id"] == body["id"]
    assert [d["id"] for d in client.get("/datasets").json()] == [body["id"]]


def test_word_mf2_and_label_raw_only(client):
    csv = "word_mf2,label_raw\n我要开通流量包,办理开通\n帮我取消彩铃,办理取消\n我要开通彩铃,办理开通\n"
    body = upload(client, csv.encode()).json()
    assert body["format"] == "cmcc_csv"
    assert [(lab["id"], lab["name"]) for lab in body["labels"]] == [(0, "办理取消"), (1, "办理开通")]


def test_generic_text_label_csv(client):
    csv = "text,label\n您好[SEP]我要交话费,缴费\n您好[SEP]网速太慢,投诉\n您好[SEP]充一百,缴费\n"
    body = upload(client, csv.encode(), "generic.csv").json()
    assert body["format"] == "text_label_csv" and body["n_rows"] == 3
    assert {lab["name"]: lab["count"] for lab in body["labels"]} == {"投诉": 1, "缴费": 2}


def _chat_line(messages) -> str:
    return json.dumps({"messages": messages}, ensure_ascii=False)


def test_jsonl_three_message_and_legacy_two_message(client):
    system = build_system_prompt(__import__("app.domain.cmcc34", fromlist=["x"]).CMCC34_LABEL_SET)
    new_lines = [
        _chat_line([{"role": "system", "content": system}, {"role": "user", "content": f"对话：{text}"},
                    {"role": "assistant", "content": format_answer(i, CMCC34_LABELS[i])}])
        for text, i in [("您好请讲[SEP]我要开通流量包", 7), ("您好请讲[SEP]帮我取消彩铃", 1)]
    ]
    body = upload(client, "\n".join(new_lines).encode(), "new.jsonl").json()
    assert body["format"] == "chat_jsonl" and body["chat_style"] == "system_prompt" and body["n_rows"] == 2

    template = "你是客服意图识别专家。分析对话内容，判断用户最终意图。\n业务类型列表：0:… 1:…\n\n对话："
    legacy_lines = [
        _chat_line([{"role": "user", "content": template + text},
                    {"role": "assistant", "content": format_answer(i, CMCC34_LABELS[i])}])
        for text, i in [("您好请讲[SEP]我要开通流量包", 7), ("您好请讲[SEP]帮我取消彩铃", 1), ("您好[SEP]开彩铃", 7)]
    ]
    response = upload(client, "\n".join(legacy_lines).encode(), "legacy.jsonl")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["chat_style"] == "legacy_template" and body["n_rows"] == 3
    records = (client.app.state.settings.datasets_dir / body["id"] / "records.jsonl").read_text(encoding="utf-8")
    assert json.loads(records.splitlines()[0])["dialogue"] == "您好请讲[SEP]我要开通流量包"


BAD_INPUTS = [
    ("missing dialogue column", b"c_numerical,label_raw\n1,a\n2,b\n", 422, ["sentence_sep"]),
    ("missing label column", b"sentence_sep,foo\nhello,1\nbye,2\n", 422, ["c_numerical"]),
    ("empty text", "sentence_sep,c_numerical\n您好,1\n ,2\n".encode(), 422, ["row 3", "sentence_sep", "empty"]),
    ("unknown label id", "sentence_sep,c_numerical\n您好,1\n再见,abc\n".encode(), 422, ["row 3", "c_numerical"]),
    ("id/name mismatch", "sentence_sep,c_numerical,label_raw\n您好,1,办理开通\n再见,2,办理取消\n喂,1,办理取消\n".encode(),
     422, ["row 4", "label_raw", "mismatch"]),
    ("not utf-8", "sentence_sep,c_numerical\n您好,1\n再见,2\n".encode("gbk"), 422, ["UTF-8"]),
    ("neither csv nor jsonl", b"just some words\n", 422, ["neither CSV", "JSONL"]),
    ("empty file", b"", 422, ["empty"]),
    ("single class", "text,label\n您好,a\n再见,a\n".encode(), 422, ["single class"]),
    ("bad json line", b'{"messages": []}\n{not json}\n', 422, ["row"]),
    ("chat roles", json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 422,
     ["row 1", "messages"]),
    ("unparseable answer", (_chat_line([{"role": "user", "content": "对话：你好"},
                                        {"role": "assistant", "content": "不知道"}]) + "\n").encode(),
     422, ["row 1", "messages.assistant"]),
    ("negative id", "sentence_sep,c_numerical\n您好,1\n再见,-2\n".encode(), 422, ["row 3", "negative"]),
]


@pytest.mark.parametrize("case,content,status,needles", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_4xx_naming_the_problem_and_leaves_nothing(client, settings, case, content, status, needles):
    response = upload(client, content, "bad.jsonl" if case in {"bad json line", "chat roles", "unparseable answer"}
                      else "bad.csv")
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text_ = json.dumps(detail, ensure_ascii=False)
    for needle in needles:
        assert needle in text_, f"{needle!r} not in {text_}"
    assert _stored_state(settings) == (0, [])


def test_upload_over_size_limit_is_413_and_leaves_nothing(tmp_path):
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    small = Settings(data_dir=tmp_path / "d", max_upload_bytes=100)
    with TestClient(create_app(small)) as client:
        response = upload(client, b"text,label\n" + b"x,a\n" * 50)
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]["message"]
        assert _stored_state(small) == (0, [])


def test_start_up_removes_staging_no_live_process_owns_but_not_one_in_flight(tmp_path):
    from fastapi.testclient import TestClient
    from filelock import FileLock

    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(data_dir=tmp_path / "d")
    orphan, in_flight = settings.datasets_dir / ".ds_old.partial", settings.datasets_dir / ".ds_new.partial"
    for folder in (orphan, in_flight):
        folder.mkdir(parents=True)
        (folder / "original.csv").write_text("text,label\n")
    stray_lock = settings.datasets_dir / ".ds_gone.partial.lock"  # its process died before making the folder
    stray_lock.touch()
    with FileLock(settings.datasets_dir / ".ds_new.partial.lock", timeout=0):  # an upload in flight holds it
        with TestClient(create_app(settings)):
            pass
        assert not orphan.exists() and not stray_lock.exists() and in_flight.is_dir()


def test_delete_dataset_removes_row_and_files(client, settings, sample_csv):
    dataset_id = upload(client, sample_csv).json()["id"]
    assert client.delete(f"/datasets/{dataset_id}").status_code == 204
    assert client.get(f"/datasets/{dataset_id}").status_code == 404
    assert _stored_state(settings) == (0, [])


def test_unknown_dataset_is_404(client):
    response = client.get("/datasets/ds_nope")
    assert response.status_code == 404 and "ds_nope" in response.json()["detail"]["message"]


def test_api_key_is_enforced_except_health_and_docs(tmp_path):
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    secured = Settings(data_dir=tmp_path / "d", api_key="s3cret")
    with TestClient(create_app(secured)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/datasets").status_code == 401
        assert client.get("/datasets", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/datasets", headers={"Authorization": "Bearer s3cret"}).status_code == 200
