"""Errors that carry their Workers AI code and HTTP status (contract section 4).

Raised anywhere below the API (registry, validation, routing); the API turns each into the envelope
`{"result": null, "success": false, "errors": [{"code": N, "message": "..."}], "messages": []}`.
"""

from __future__ import annotations

from typing import ClassVar


class WorkersAIError(Exception):
    code: ClassVar[int] = 5006
    status: ClassVar[int] = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def envelope(self) -> dict[str, object]:
        return {
            "result": None,
            "success": False,
            "errors": [{"code": self.code, "message": self.message}],
            "messages": [],
        }


class AuthenticationError(WorkersAIError):
    code, status = 10000, 401

    def __init__(self, message: str = "Authentication error") -> None:
        super().__init__(message)


class RouteNotFound(WorkersAIError):
    code, status = 7003, 404

    def __init__(self, path: str) -> None:
        super().__init__(f"Could not route to {path}, perhaps your object identifier is invalid?")


class BadInput(WorkersAIError):
    code, status = 5006, 400

    def __init__(self, detail: str) -> None:
        super().__init__(f"AiError: Bad input: {detail}")


class NoSuchModel(WorkersAIError):
    code, status = 5007, 400

    def __init__(self, model: str, hint: str | None = None) -> None:
        # Workers AI's own message, then (for a model this server knows but was not started with) how
        # to serve it: a user trying the seed's model id learns what to do, not just that it failed.
        super().__init__(f"No such model {model} or task" + (f": {hint}" if hint else ""))


class LoraNotSupported(WorkersAIError):
    code, status = 5005, 405

    def __init__(self, model: str) -> None:
        super().__init__(f"AiError: Model {model} does not support LoRA adapters")


class FinetuneNotFound(WorkersAIError):
    code, status = 3037, 404

    def __init__(self, ref: str) -> None:
        super().__init__(f"Finetune {ref} not found")


class InvalidFinetune(WorkersAIError):
    """A finetune is missing a file, or an uploaded file is invalid; the message names the problem."""

    code, status = 3039, 400


class FinetuneConflict(WorkersAIError):
    """A finetune name already taken in the account, or a reserved name (schema-level input error)."""

    code, status = 5006, 400


class MissingBody(WorkersAIError):
    code, status = 3003, 400


class RequestTooLarge(WorkersAIError):
    code, status = 3006, 413

    def __init__(self, message: str = "Request is too large") -> None:
        super().__init__(message)


class ContextWindowExceeded(WorkersAIError):
    code, status = 5021, 413

    def __init__(self, needed: int, window: int) -> None:
        super().__init__(
            f"The estimated number of input and maximum output tokens ({needed}) exceeded this model "
            f"context window limit ({window})"
        )


class RateLimited(WorkersAIError):
    code, status = 3036, 429

    def __init__(self, message: str = "Account limited: too many requests, please try again later.") -> None:
        super().__init__(message)


class CapacityExceeded(WorkersAIError):
    code, status = 3040, 429

    def __init__(self, message: str = "Capacity temporarily exceeded, please try again.") -> None:
        super().__init__(message)


class EngineLost(CapacityExceeded):
    """The engine stopped under a request (its process died, or a step failed); a retry is served once it
    is back, so the answer is the capacity one, with its own message."""

    def __init__(self) -> None:
        super().__init__("The model stopped before this request finished, please try again.")


class RegistryUnavailable(CapacityExceeded):
    """The registry database does not answer (down, restarting, unreachable): the capacity answer, retry
    later. Raised by every registry call while it lasts (registry/outage.py)."""

    def __init__(self) -> None:
        super().__init__(
            "Capacity temporarily exceeded: the registry database is unavailable, please try again."
        )


class RequestTimeout(WorkersAIError):
    code, status = 3007, 408

    def __init__(self) -> None:
        super().__init__("Request timeout")


class AccountLimitExceeded(WorkersAIError):
    """Too many finetunes in one account (the public service's per-account cap)."""

    code, status = 3036, 429
