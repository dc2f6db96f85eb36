"""Service-level errors; the API maps them to HTTP status codes in one place (app.main)."""


def field_path(loc: tuple | list) -> str:
    """A validation error's location as the API names fields: ``("body", "labels", 2, 0)`` → ``labels[2][0]``,
    ``("hyperparameters", "target_modules", 0)`` → ``hyperparameters.target_modules[0]``; the request part
    (body, query, path) is left out."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message, self.row, self.field = message, row, field

    def detail(self) -> dict:
        detail = {"message": self.message}
        if self.row is not None:
            detail["row"] = self.row
        if self.field is not None:
            detail["field"] = self.field
        return detail


class NotFoundError(ServiceError):
    status_code = 404


class ConflictError(ServiceError):
    status_code = 409


class UnprocessableError(ServiceError):
    status_code = 422


class PayloadTooLargeError(ServiceError):
    status_code = 413


class ServiceUnavailableError(ServiceError):
    """503: the inference engine cannot answer now; ``retry_after`` seconds go to the Retry-After header."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int | None = None, field: str | None = None):
        super().__init__(message, field=field)
        self.retry_after = retry_after
