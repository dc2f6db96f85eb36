"""One rule for label names (app.domain.prompt.check_label_name), for every upload format and for the zero-shot
labels of /classify: a name is written into the system prompt and into every answer, so it must read back
through parse_answer (issue 9, item 10).

Names with a newline, or holding the answer format (`意图：3：x`), used to be stored verbatim and broke
parse_answer; a name with `]` was cut short by it.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt, format_answer, parse_answer
from tests.conftest import upload
from tests.test_datasets_api import _stored_state

OK_NAME = "办理开通"
DIALOGUES = ["您好请讲[SEP]我要开通流量包", "您好请讲[SEP]帮我取消彩铃", "您好[SEP]开彩铃"]


def _csv(header: list[str], rows: list[list]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def cmcc_csv(bad: str) -> tuple[bytes, str]:
    rows = [[DIALOGUES[0], 1, OK_NAME], [DIALOGUES[1], 2, bad], [DIALOGUES[2], 1, OK_NAME]]
    return _csv(["sentence_sep", "c_numerical", "label_raw"], rows), "data.csv"


def text_label_csv(bad: str) -> tuple[bytes, str]:
    rows = [[DIALOGUES[0], OK_NAME], [DIALOGUES[1], bad], [DIALOGUES[2], OK_NAME]]
    return _csv(["text", "label"], rows), "data.csv"


def _chat(answers: list[tuple[int, str]], system: bool) -> bytes:
    lines = []
    for dialogue, (label_id, name) in zip(DIALOGUES, answers):
        messages = [{"role": "user", "content": f"对话：{dialogue}"},
                    {"role": "assistant", "content": format_answer(label_id, name)}]
        if system:
            messages.insert(0, {"role": "system", "content": "你是客服对话意图识别专家。"})
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def jsonl_three(bad: str) -> tuple[bytes, str]:
    return _chat([(1, OK_NAME), (2, bad), (1, OK_NAME)], system=True), "data.jsonl"


def jsonl_two(bad: str) -> tuple[bytes, str]:
    return _chat([(1, OK_NAME), (2, bad), (1, OK_NAME)], system=False), "data.jsonl"


FORMATS = {"cmcc_csv": (cmcc_csv, "label_raw"), "text_label_csv": (text_label_csv, "label"),
           "jsonl_3": (jsonl_three, "messages.assistant"), "jsonl_2": (jsonl_two, "messages.assistant")}
BAD_NAMES = {
    "answer format": ("意图：3：x", "answer prefix"),
    "answer prefix, ascii colon": ("查询意图: 套餐", "answer prefix"),
    "leading id": ("3：办理取消", "read as a label id"),
    "invisible": ("办理\u200b取消", "U+200B"),
    "control": ("办理\x07取消", "U+0007"),
    "too long": ("长" * 101, "over the limit of 100"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad_case", BAD_NAMES)
def test_a_name_that_breaks_the_answer_format_is_422_naming_row_and_field(client, settings, fmt, bad_case):
    make, field = FORMATS[fmt]
    name, needle = BAD_NAMES[bad_case]
    content, filename = make(name)
    response = upload(client, content, filename)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["row"] == (3 if "csv" in fmt else 2), detail  # a CSV's header is row 1
    assert detail["field"] == field and needle in detail["message"], detail
    assert _stored_state(settings) == (0, [])


@pytest.mark.parametrize("fmt", ["cmcc_csv", "text_label_csv"])
def test_whitespace_runs_in_a_name_become_one_space(client, fmt):
    content, filename = FORMATS[fmt][0](" 办理\n\t 取消 ")
    response = upload(client, content, filename)
    assert response.status_code == 201, response.text
    names = {label["name"] for label in response.json()["labels"]}
    assert names == {OK_NAME, "办理 取消"}


def test_a_multi_line_answer_in_jsonl_is_422(client, settings):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"对话：{d}"},
                                      {"role": "assistant", "content": answer}]}, ensure_ascii=False)
             for d, answer in zip(DIALOGUES, ["意图：1：办理开通", "意图：2：办理\n取消", "意图：1：办理开通"])]
    response = upload(client, "\n".join(lines).encode(), "data.jsonl")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert (detail["row"], detail["field"]) == (2, "messages.assistant") and "line break" in detail["message"]
    assert _stored_state(settings) == (0, [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_name_with_brackets_is_stored_whole_and_read_back(client, fmt):
    name = "套餐[4G]变更]"
    content, filename = FORMATS[fmt][0](name)
    response = upload(client, content, filename)
    assert response.status_code == 201, response.text
    stored = LabelSet.from_pairs([(lab["id"], lab["name"]) for lab in response.json()["labels"]])
    label_id = stored.id_of(name)
    assert label_id is not None, stored
    assert parse_answer(format_answer(label_id, name), stored).label_id == label_id


@pytest.mark.parametrize("name", ["办理开通", "套餐[4G]", "[老用户]办理", "5G套餐", "3", "a：b：c", "：开头"])
def test_every_accepted_name_reads_back_through_parse_answer(name):
    from app.domain.prompt import check_label_name

    assert check_label_name(name) == name
    labels = LabelSet.from_pairs([(0, "其他"), (12, name)])
    assert "12：" + name in build_system_prompt(labels)
    for answer in (format_answer(12, name), f"意图：[12：{name}]", f"意图：[12]：{name}", f"12：{name}", name):
        assert parse_answer(answer, labels).label_id == 12, answer


def test_zero_shot_labels_follow_the_same_rule(client):
    text = "您好请讲[SEP]我要开通流量包"
    response = client.post("/classify", json={"model": "tiny-glm4", "text": text,
                                              "labels": [[0, "办理\n开通"], [1, "3：办理取消"]]})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == "labels[1][1]"
    response = client.post("/classify", json={"model": "tiny-glm4", "text": text,
                                              "labels": [[0, " 办理\n开通 "], [1, "办理取消"]]})
    assert response.status_code == 200, response.text
    assert {top["label"] for top in response.json()["predictions"][0]["top_k"]} == {"办理 开通", "办理取消"}
