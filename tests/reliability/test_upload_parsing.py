"""Uploads that used to answer 500 (issue 9, item 4): a CSV cell over the csv module's 131,072-character
field limit, JSON nested past the recursion limit, lone surrogates spelled as JSON escapes. A long cell is
a plausible dialogue and is accepted; the others are a 422 naming the row (and field), with nothing stored.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import upload
from tests.test_datasets_api import _stored_state

LONG_DIALOGUE = "您好请讲[SEP]" + "我想问一下流量包的事情" * 100_000  # 1.1 M characters, 3.3 MB of UTF-8


@pytest.mark.parametrize("header", ["sentence_sep,c_numerical,label_raw", "text,label"])
def test_a_one_megabyte_dialogue_in_a_csv_cell_is_accepted(client, settings, header):
    rows = [f"{LONG_DIALOGUE},1,办理开通", "您好[SEP]帮我取消彩铃,2,办理取消"]
    if header == "text,label":
        rows = [row.rsplit(",", 2)[0] + "," + row.rsplit(",", 1)[1] for row in rows]
    response = upload(client, (header + "\n" + "\n".join(rows) + "\n").encode())
    assert response.status_code == 201, response.text[:500]
    body = response.json()
    assert body["n_rows"] == 2 and body["stats"]["chars"]["dialogue_max"] == len(LONG_DIALOGUE)
    records = (settings.datasets_dir / body["id"] / "records.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(records[0])["dialogue"] == LONG_DIALOGUE


def _line(user: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


GOOD = [_line("对话：您好[SEP]我要开通流量包", "意图：1：办理开通"), _line("对话：您好[SEP]取消彩铃", "意图：2：办理取消")]
DEEP = "[" * 100_000 + "]" * 100_000

BAD_JSON = {
    # name: (file content, row, field, words of the message)
    "deep line": ("\n".join([GOOD[0], DEEP, GOOD[1]]), 2, None, "nested too deeply"),
    "deep messages": ("\n".join([GOOD[0], GOOD[1], '{"messages": ' + DEEP + "}"]), 3, None, "nested too deeply"),
    "deep array": ("[" + DEEP + "]", 1, None, "nested too deeply"),
    "surrogate in dialogue": ("\n".join([GOOD[0], _line("对话：您好\ud800", "意图：2：办理取消")]), 2, "messages.user",
                              "lone surrogate (\\ud800)"),
    "surrogate in label name": ("\n".join([_line("对话：你好", "意图：1：办理\udfff开通"), GOOD[1]]), 1,
                                "messages.assistant", "lone surrogate (\\udfff)"),
}


@pytest.mark.parametrize("case", BAD_JSON)
def test_malformed_json_is_422_naming_the_row(client, settings, case):
    content, row, field, words = BAD_JSON[case]
    assert content.isascii()  # the surrogates are JSON escapes, as a client's json.dumps writes them
    response = upload(client, content.encode(), "data.jsonl")
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"]
    assert detail["row"] == row and detail.get("field") == field and words in detail["message"], detail
    assert _stored_state(settings) == (0, [])


@pytest.mark.parametrize("label_id,words", [("9" * 5000, "over the largest accepted id"), ("-" + "9" * 5000, "negative"),
                                            ("9" * 4000, "over the largest accepted id"), ("x" * 5000, "not an integer")])
def test_a_huge_label_id_is_422_without_echoing_the_cell(client, settings, label_id, words):
    content = f"sentence_sep,c_numerical\n您好[SEP]开通流量包,1\n您好[SEP]取消彩铃,{label_id}\n".encode()
    response = upload(client, content)
    assert response.status_code == 422, response.text[:300]
    detail = response.json()["detail"]
    assert (detail["row"], detail["field"]) == (3, "c_numerical") and words in detail["message"], detail
    assert len(detail["message"]) < 200, detail["message"]
    assert _stored_state(settings) == (0, [])
