"""The one place the classification prompt is built.

A model is trained and served with a single shared system prompt built from its label set:
the task, the input format, the judgement criteria, the numbered label list and the output
format ``意图：{id}：{label}``. Each sample then only adds the user turn ``对话：{dialogue}``
and the assistant answer. Because the system prompt is byte-identical for every sample of a
model, its tokens form a shared prefix that training and serving compute once
(see ``app.ml.train.shared_prefix`` and ``app.ml.infer.scoring``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from app.domain.labels import LabelSet

USER_PREFIX = "对话："
ANSWER_PREFIX = "意图："

# The older upstream format pasted an instruction template into every user message; the
# dialogue followed one of these markers (the last one in the message wins).
_LEGACY_DIALOGUE_MARKERS = ("对话内容：", "对话内容:", "对话：", "对话:")

# 意图：{id}：{name}, also 意图：[{id}]：{name} and 意图：[{id}：{name}]; the name runs to the end of the line.
_ANSWER_RE = re.compile(r"意图\s*[：:]\s*(\[)?\s*(\d+)\s*(\])?\s*[：:]?\s*([^\n]*)")
_BARE_ID_RE = re.compile(r"^\s*(\d+)\s*[：:]\s*(.*)$")
_ANSWER_PREFIX_RE = re.compile(r"意图\s*[：:]")
_WHITESPACE_RUN_RE = re.compile(r"\s+")

MAX_LABEL_NAME_CHARS = 100


def build_system_prompt(label_set: LabelSet) -> str:
    """Build the shared system prompt for a label set (stored once per dataset/model)."""
    label_lines = "\n".join(f"{lab.id}：{lab.name}" for lab in label_set)
    return (
        "你是客服对话意图识别专家。阅读一段客服与用户的通话记录，判断用户来电的最终意图，"
        f"并从下面 {len(label_set)} 个意图中选出唯一一个。\n"
        "\n"
        "输入格式：对话在“对话：”之后给出，各说话轮次之间用 [SEP] 分隔，通常以客服的“您好请讲”开始。\n"
        "\n"
        "判断标准：\n"
        "1. 以用户的最终诉求为准，不看中间过程和寒暄；\n"
        "2. 区分咨询（了解信息）、办理（要求执行操作）和投诉（表达不满）；\n"
        "3. 结合关键词和上下文综合判断，有多个诉求时选最主要的一个。\n"
        "\n"
        f"意图列表：\n{label_lines}\n"
        "\n"
        f"输出格式：只输出一行“{ANSWER_PREFIX}{{编号}}：{{意图名称}}”，不要输出其他内容。"
    )


def format_user_turn(dialogue: str) -> str:
    return f"{USER_PREFIX}{dialogue}"


def format_answer(label_id: int, label_name: str) -> str:
    return f"{ANSWER_PREFIX}{label_id}：{label_name}"


def build_messages(system_prompt: str, dialogue: str, answer: str | None = None) -> list[dict]:
    """Chat messages for one sample: shared system prompt, user dialogue, optional answer."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": format_user_turn(dialogue)},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def extract_dialogue(user_content: str) -> str:
    """The dialogue inside a user turn, in the new (``对话：…``) or the legacy template format."""
    best = -1
    best_marker = ""
    for marker in _LEGACY_DIALOGUE_MARKERS:
        pos = user_content.rfind(marker)
        if pos > best:
            best, best_marker = pos, marker
    if best < 0:
        return user_content.strip()
    return user_content[best + len(best_marker):].strip()


@dataclass(frozen=True)
class ParsedAnswer:
    label_id: int | None
    label_name: str | None


def parse_answer(text: str, label_set: LabelSet | None = None) -> ParsedAnswer:
    """Parse ``意图：{id}：{label}`` (also ``{id}：{label}`` or a bare label name).

    Returns ids only when they are consistent with ``label_set`` (when given): an id that is
    not in the set, or a name that contradicts the id, yields ``label_id=None``.
    """
    text = text.strip()
    found = _match_answer(text)
    if found:
        label_id, name = found
        if label_set is None:
            return ParsedAnswer(label_id, name)
        if label_id in label_set.ids:
            expected = label_set.name_of(label_id)
            if name is None or name == expected:
                return ParsedAnswer(label_id, expected)
        return ParsedAnswer(None, name)
    if label_set is not None:
        bare = text.removeprefix(ANSWER_PREFIX).strip()
        found_id = label_set.id_of(bare)
        if found_id is not None:
            return ParsedAnswer(found_id, bare)
    return ParsedAnswer(None, None)


def _match_answer(text: str) -> tuple[int, str | None] | None:
    match = _ANSWER_RE.search(text)
    if match:
        opened, label_id, closed, name = match.groups()
        name = name.strip()
        if opened and not closed:  # 意图：[{id}：{name}]
            name = name.removesuffix("]").rstrip()
        return int(label_id), name or None
    match = _BARE_ID_RE.match(text)
    if match:
        return int(match.group(1)), match.group(2).strip() or None
    return None


def check_label_name(name: str) -> str:
    """The one rule for a label name, for uploads and zero-shot labels alike: the name is written into the
    system prompt's label list and into every answer, so it must read back through :func:`parse_answer`.

    Whitespace runs (newlines included) become one space and the ends are stripped; a name that is then
    empty, over ``MAX_LABEL_NAME_CHARS``, holds a control or invisible character, holds the answer prefix
    ``意图：`` or starts like an id (``{digits}：``) is refused with a ``ValueError`` saying why.
    Returns the normalised name.
    """
    name = _WHITESPACE_RUN_RE.sub(" ", name).strip()
    if not name:
        raise ValueError("the label name is empty")
    if len(name) > MAX_LABEL_NAME_CHARS:
        raise ValueError(f"the label name has {len(name)} characters, over the limit of {MAX_LABEL_NAME_CHARS}")
    bad = next((c for c in name if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise ValueError(f"the label name holds the control or invisible character U+{ord(bad):04X}")
    if _ANSWER_PREFIX_RE.search(name):
        raise ValueError(f"the label name holds the answer prefix '{ANSWER_PREFIX}'")
    if _BARE_ID_RE.match(name):
        raise ValueError("the label name starts with '{digits}：', which an answer would read as a label id")
    return name
