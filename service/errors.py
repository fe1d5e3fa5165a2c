"""The few errors the service raises on purpose; each docstring is its default message."""

from __future__ import annotations


class ServiceError(Exception):
    """Unexpected service error."""

    code = "service_error"
    status = 500

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(ServiceError):
    """A setting is missing or malformed."""

    code = "config_error"


class MigrationError(ServiceError):
    """A migration could not be applied."""

    code = "migration_error"


class InvalidEvent(ServiceError):
    """The event was refused by the event store."""

    code = "invalid_event"
    status = 400


class NotFound(ServiceError):
    """No such thing."""

    code = "not_found"
    status = 404
