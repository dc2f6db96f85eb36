"""Whether one label set may be read with another's meaning: every id known, and named the same."""

from __future__ import annotations

from app.services.errors import UnprocessableError


def check_labels_match(known: list, given: list, *, field: str, known_as: str, given_as: str) -> None:
    """422 naming ``field`` when ``given`` ([id, name] pairs) has an id ``known`` lacks or names an id otherwise.

    A dataset whose label ids mean other intents would otherwise be trained, validated or evaluated
    against the wrong names, silently.
    """
    names = {int(i): n for i, n in known}
    unknown = sorted({int(i) for i, _ in given} - set(names))
    if unknown:
        raise UnprocessableError(f"{given_as} has label ids {unknown} that {known_as} lacks", field=field)
    clash = [(int(i), n) for i, n in given if names[int(i)] != n]
    if clash:
        shown = ", ".join(f"{i} is '{n}' there but '{names[i]}' in {known_as}" for i, n in clash[:5])
        more = f" (and {len(clash) - 5} more)" if len(clash) > 5 else ""
        raise UnprocessableError(f"label ids {[i for i, _ in clash]} have other names in {given_as}: {shown}{more}",
                                 field=field)
