"""ServerSettings: the defaults of the contract, and refusal of nonsense."""

from __future__ import annotations

from typing import Any

import pytest

from loraserve.api import ServerSettings


def test_defaults() -> None:
    settings = ServerSettings()
    assert settings.rate_limit_per_minute == 300  # the public service's text-generation limit
    assert settings.request_timeout_s is None
    assert settings.max_run_body_bytes >= 1024 * 1024


@pytest.mark.parametrize(
    "kwargs",
    [{"max_run_body_bytes": 0}, {"max_json_body_bytes": -1}, {"max_run_body_bytes": True},
     {"rate_limit_per_minute": -1}, {"rate_limit_per_minute": 1.5}, {"request_timeout_s": 0},
     {"request_timeout_s": -2.0}],
)
def test_invalid(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerSettings(**kwargs)
