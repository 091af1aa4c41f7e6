"""A Python client for a loraserve (or Workers AI) account: `Client(...).run(model, inputs)`.

The call mirrors the Workers binding `env.AI.run(model, inputs)`: the result dict, or with
`"stream": True` an iterator of text deltas whose `.usage` is set once it is exhausted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8787"
ASSET_FILES = ("adapter_config.json", "adapter_model.safetensors")
_API_ROOT = "/client/v4"


class APIError(Exception):
    """An error envelope from the server: the first error's code and message, and the HTTP status."""

    def __init__(
        self, status: int, code: int, message: str, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors or []


class StreamInterrupted(APIError):
    """A streamed run that broke off before the server's `[DONE]` (connection lost, server gone): the
    text received so far is incomplete. `__cause__` holds the transport error, if there was one."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, 0, f"the stream ended before its [DONE]: {detail}")


def _api_error(status: int, body: Any) -> APIError:
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        return APIError(status, int(first.get("code", 0)), str(first.get("message", "")), errors)
    return APIError(status, 0, f"unexpected response: {str(body)[:200]}")


def _result(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        raise APIError(response.status_code, 0, f"not JSON: {response.text[:200]}") from None
    if response.is_success and isinstance(body, dict) and body.get("success") is True:
        return body.get("result")
    raise _api_error(response.status_code, body)


def _account_url(base_url: str, account_id: str) -> str:
    root = base_url.rstrip("/")
    # Accept Workers AI's own base URL form (".../client/v4") as well as the server's root.
    root = root.removesuffix(_API_ROOT)
    return f"{root}{_API_ROOT}/accounts/{account_id}/ai"


def _asset_paths(folder: Path) -> list[Path]:
    paths = [folder / name for name in ASSET_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: missing {', '.join(missing)} (required: {', '.join(ASSET_FILES)})"
        )
    return paths


class _SSEDecoder:
    """Turns the lines of a /run stream into text deltas; remembers the usage event."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.usage: dict[str, Any] | None = None  # counts, and prompt_tokens_details.cached_tokens
        self.done = False

    def feed(self, line: str) -> str | None:
        if not line.startswith("data:"):
            return None
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "errors" in event and event.get("success") is False:
            raise _api_error(self.status, event)
        if "usage" in event:
            self.usage = event["usage"]
        text = event.get("response", "")
        return text if isinstance(text, str) and text else None


class RunStream:
    """Iterator of the text deltas of a streamed run; `.usage` once it has ended."""

    def __init__(self, response: httpx.Response, closer: Callable[[], None]) -> None:
        self._response = response
        self._closer = closer
        self._decoder = _SSEDecoder(response.status_code)

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._decoder.usage

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self._response.iter_lines():
                text = self._decoder.feed(line)
                if text is not None:
                    yield text
                if self._decoder.done:
                    return
        except httpx.TransportError as exc:
            raise StreamInterrupted(self._decoder.status, repr(exc)) from exc
        finally:
            self.close()
        raise StreamInterrupted(self._decoder.status, "the connection closed")

    def close(self) -> None:
        """Stop early: closing the connection makes the server abort the generation."""
        self._closer()

    def __enter__(self) -> RunStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncRunStream:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._decoder = _SSEDecoder(response.status_code)

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._decoder.usage

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                text = self._decoder.feed(line)
                if text is not None:
                    yield text
                if self._decoder.done:
                    return
        except httpx.TransportError as exc:
            raise StreamInterrupted(self._decoder.status, repr(exc)) from exc
        finally:
            await self.aclose()
        raise StreamInterrupted(self._decoder.status, "the connection closed")

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncRunStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()


class Client:
    def __init__(
        self, account_id: str, token: str, base_url: str = DEFAULT_BASE_URL, *, timeout: float = 300.0,
    ) -> None:
        self.account_id = account_id
        self._http = httpx.Client(
            base_url=_account_url(base_url, account_id),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def run(self, model: str, inputs: Mapping[str, Any]) -> dict[str, Any] | RunStream:
        """The result dict (`{"response": ..., "usage": ...}`), or a RunStream when inputs ask to stream."""
        if inputs.get("stream") is True:
            return self.stream(model, inputs)
        result: dict[str, Any] = _result(self._http.post(f"/run/{model}", json=dict(inputs)))
        return result

    def stream(self, model: str, inputs: Mapping[str, Any]) -> RunStream:
        request = self._http.build_request("POST", f"/run/{model}", json={**inputs, "stream": True})
        response = self._http.send(request, stream=True)
        if not response.is_success:
            response.read()
            response.close()
            _result(response)
        return RunStream(response, response.close)

    # finetunes (wrangler's `ai finetune create/list` and the extra get/delete)

    def new_finetune(
        self, model: str, name: str, description: str = "", public: bool = False
    ) -> dict[str, Any]:
        body = {"model": model, "name": name, "description": description, "public": public}
        result: dict[str, Any] = _result(self._http.post("/finetunes", json=body))
        return result

    def upload_asset(self, ref: str, path: Path, file_name: str | None = None) -> dict[str, Any]:
        with path.open("rb") as f:
            response = self._http.post(
                f"/finetunes/{ref}/finetune-assets",
                data={"file_name": file_name or path.name},
                files={"file": (path.name, f, "application/octet-stream")},
            )
        result: dict[str, Any] = _result(response)
        return result

    def create_finetune(
        self, model: str, name: str, folder: str | Path, description: str = "", public: bool = False
    ) -> dict[str, Any]:
        """What `wrangler ai finetune create` does: create, then upload each adapter file."""
        paths = _asset_paths(Path(folder))
        finetune = self.new_finetune(model, name, description, public)
        for path in paths:
            self.upload_asset(finetune["id"], path)
        return finetune

    def list_finetunes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = _result(self._http.get("/finetunes"))
        return result

    def list_public_finetunes(self, **params: Any) -> list[dict[str, Any]]:
        """Keyword arguments `limit`, `offset`, `orderBy` as the API takes them."""
        result: list[dict[str, Any]] = _result(self._http.get("/finetunes/public", params=params))
        return result

    def get_finetune(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = _result(self._http.get(f"/finetunes/{ref}"))
        return result

    def delete_finetune(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = _result(self._http.delete(f"/finetunes/{ref}"))
        return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    def __init__(
        self, account_id: str, token: str, base_url: str = DEFAULT_BASE_URL, *, timeout: float = 300.0,
    ) -> None:
        self.account_id = account_id
        self._http = httpx.AsyncClient(
            base_url=_account_url(base_url, account_id),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    async def run(self, model: str, inputs: Mapping[str, Any]) -> dict[str, Any] | AsyncRunStream:
        if inputs.get("stream") is True:
            return await self.stream(model, inputs)
        result: dict[str, Any] = _result(await self._http.post(f"/run/{model}", json=dict(inputs)))
        return result

    async def stream(self, model: str, inputs: Mapping[str, Any]) -> AsyncRunStream:
        request = self._http.build_request("POST", f"/run/{model}", json={**inputs, "stream": True})
        response = await self._http.send(request, stream=True)
        if not response.is_success:
            await response.aread()
            await response.aclose()
            _result(response)
        return AsyncRunStream(response)

    async def new_finetune(
        self, model: str, name: str, description: str = "", public: bool = False
    ) -> dict[str, Any]:
        body = {"model": model, "name": name, "description": description, "public": public}
        result: dict[str, Any] = _result(await self._http.post("/finetunes", json=body))
        return result

    async def upload_asset(self, ref: str, path: Path, file_name: str | None = None) -> dict[str, Any]:
        # Adapters are at most a few hundred MB; read whole, as httpx's async multipart needs bytes.
        content = path.read_bytes()
        response = await self._http.post(
            f"/finetunes/{ref}/finetune-assets",
            data={"file_name": file_name or path.name},
            files={"file": (path.name, content, "application/octet-stream")},
        )
        result: dict[str, Any] = _result(response)
        return result

    async def create_finetune(
        self, model: str, name: str, folder: str | Path, description: str = "", public: bool = False
    ) -> dict[str, Any]:
        paths = _asset_paths(Path(folder))
        finetune = await self.new_finetune(model, name, description, public)
        for path in paths:
            await self.upload_asset(finetune["id"], path)
        return finetune

    async def list_finetunes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = _result(await self._http.get("/finetunes"))
        return result

    async def list_public_finetunes(self, **params: Any) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = _result(await self._http.get("/finetunes/public", params=params))
        return result

    async def get_finetune(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = _result(await self._http.get(f"/finetunes/{ref}"))
        return result

    async def delete_finetune(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = _result(await self._http.delete(f"/finetunes/{ref}"))
        return result

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
