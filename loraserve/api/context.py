"""What every route needs, hung on the app: the registry, the loaded models, the settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.requests import HTTPConnection

from loraserve.api.ratelimit import RateLimiter
from loraserve.api.settings import ServerSettings
from loraserve.registry import Registry
from loraserve.types import Backend


@dataclass(frozen=True)
class AppContext:
    registry: Registry
    backends: Mapping[str, Backend]  # served model id -> model; one backend may serve several ids
    settings: ServerSettings
    rate_limiter: RateLimiter

    def distinct_backends(self) -> list[Backend]:
        unique: dict[int, Backend] = {}
        for backend in self.backends.values():
            unique.setdefault(id(backend), backend)
        return list(unique.values())


def attach(app: FastAPI, context: AppContext) -> None:
    app.state.loraserve = context


def get_context(conn: HTTPConnection) -> AppContext:
    context = conn.app.state.loraserve
    assert isinstance(context, AppContext)  # set by create_app before the first request
    return context
