"""Service-level errors; the API maps them to HTTP status codes in one place (app.main)."""


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
