"""The upload's other inputs follow the same line as its rows: the `name` form field is one line of visible
text (a 422 naming it otherwise), and the client's file name is stored without control characters.
Both used to be stored verbatim (a NUL, a newline, a C1 control from a mis-decoded header)."""

from __future__ import annotations

import pytest

from tests.conftest import upload
from tests.test_datasets_api import _stored_state

ROWS = "text,label\n您好[SEP]我要交话费,缴费\n您好[SEP]网速太慢,投诉\n".encode()


@pytest.mark.parametrize("name,needle", [("a\x00b", "U+0000"), ("报表\u200e", "U+200E"), ("x" * 201, "200")])
def test_a_name_that_is_not_one_line_of_visible_text_is_422(client, settings, name, needle):
    response = upload(client, ROWS, name=name)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "name" and needle in detail["message"], detail
    assert _stored_state(settings) == (0, [])


def test_whitespace_in_a_name_becomes_one_space_and_control_characters_leave_the_file_name(client):
    body = upload(client, ROWS, filename="月度\x85数据.csv", name="  月度\n 数据 ").json()
    assert (body["name"], body["original_filename"]) == ("月度 数据", "月度 数据.csv")
    # sent as raw bytes: a client library would percent-escape the control characters
    multipart = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="\x1b[31m\x07x.csv"\r\n\r\n'
                 + ROWS + b"\r\n--B--\r\n")
    response = client.post("/datasets", content=multipart, headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 201, response.text
    assert (response.json()["name"], response.json()["original_filename"]) == ("[31mx", "[31mx.csv")
