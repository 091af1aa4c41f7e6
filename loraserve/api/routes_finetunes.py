"""/accounts/{account_id}/ai/finetunes: create, upload assets, list, public list, get, delete
(contract section 3). Registry calls block on SQLite and disk, so they run in the thread pool."""

from __future__ import annotations

import io
from functools import partial
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Query, Request
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse

from loraserve import catalog
from loraserve.api.auth import Account
from loraserve.api.context import AppContext, get_context
from loraserve.api.envelope import success_response
from loraserve.api.openapi_models import (
    AssetEnvelope,
    FinetuneEnvelope,
    FinetuneListEnvelope,
    finetune_create_body,
    upload_body,
)
from loraserve.api.schemas import FinetuneCreate
from loraserve.api.validation import read_json_object, validate
from loraserve.errors import BadInput, MissingBody
from loraserve.registry.records import AssetFile, PublicOrder
from loraserve.types import ModelInfo

router = APIRouter(prefix="/finetunes")
MAX_OFFSET = 2**53  # every whole float up to here is exact, and it fits the database's 64-bit integers


def _whole(value: float | None) -> float | None:
    # pydantic's multiple_of lets through what is within float epsilon of a multiple (2.5e-42).
    if value is not None and not value.is_integer():
        raise ValueError("must be a whole number")
    return value


@router.post("", openapi_extra=finetune_create_body(), responses={200: {"model": FinetuneEnvelope}})
async def create_finetune(request: Request, account: Account) -> JSONResponse:
    context = get_context(request)
    body = validate(FinetuneCreate, await read_json_object(request))
    # Stored under the id that serves it, so "@cf/x/y" and "@cf/x/y-lora" name one base model.
    model = catalog.resolve(body.model, context.backends.keys(), lora=True)
    finetune = await run_in_threadpool(
        context.registry.create_finetune, account, model, body.name, body.description or "", body.public
    )
    return success_response(finetune.to_api())


@router.get("", responses={200: {"model": FinetuneListEnvelope}})
async def list_finetunes(request: Request, account: Account) -> JSONResponse:
    finetunes = await run_in_threadpool(get_context(request).registry.list_finetunes, account)
    return success_response([f.to_api() for f in finetunes])


@router.get("/public", responses={200: {"model": FinetuneListEnvelope}})
async def list_public_finetunes(
    request: Request,
    account: Account,
    # Floats because the official SDK types them so (and may send "10.0"); whole numbers only.
    limit: Annotated[float | None, Query(ge=1, le=1000, multiple_of=1), AfterValidator(_whole)] = None,
    offset: Annotated[float | None, Query(ge=0, le=MAX_OFFSET, multiple_of=1), AfterValidator(_whole)] = None,
    order_by: Annotated[PublicOrder | None, Query(alias="orderBy")] = None,
) -> JSONResponse:
    # Only what the caller gave is passed on: the registry owns the defaults.
    given: dict[str, Any] = {}
    if limit is not None:
        given["limit"] = int(limit)
    if offset is not None:
        given["offset"] = int(offset)
    if order_by is not None:
        given["order_by"] = order_by.value
    registry = get_context(request).registry
    finetunes = await run_in_threadpool(partial(registry.list_public, **given))
    return success_response([f.to_api() for f in finetunes])


@router.get("/{ref}", responses={200: {"model": FinetuneEnvelope}})
async def get_finetune(request: Request, ref: str, account: Account) -> JSONResponse:
    finetune = await run_in_threadpool(get_context(request).registry.get_finetune, account, ref)
    return success_response(finetune.to_api())


@router.delete("/{ref}", responses={200: {"model": FinetuneEnvelope}})
async def delete_finetune(request: Request, ref: str, account: Account) -> JSONResponse:
    context = get_context(request)
    finetune = await run_in_threadpool(context.registry.delete_finetune, account, ref)
    _forget(context, finetune.id)
    return success_response(finetune.to_api())


@router.post("/{ref}/finetune-assets", openapi_extra=upload_body(), responses={200: {"model": AssetEnvelope}})
async def upload_asset(request: Request, ref: str, account: Account) -> JSONResponse:
    context = get_context(request)
    finetune = await run_in_threadpool(context.registry.get_finetune, account, ref)
    base = _base_model(context, finetune.model)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise MissingBody("Bad request: expected a multipart/form-data body with fields file_name and file")
    # The body size is capped while it streams in (BodyLimitMiddleware); parts may be that large.
    async with request.form(max_files=2, max_fields=8, max_part_size=_upload_part_limit(context)) as form:
        file = form.get("file")
        if file is None:
            raise BadInput("file: required (the adapter file, as a multipart file field)")
        file_name = form.get("file_name")
        if file_name is None and isinstance(file, UploadFile):
            # curl -F file=@adapter_config.json without file_name: the upload's own name says it.
            file_name = file.filename
        if not isinstance(file_name, str) or not file_name:
            names = " or ".join(f.value for f in AssetFile)
            raise BadInput(f"file_name: required ({names})")
        source: BinaryIO = file.file if isinstance(file, UploadFile) else io.BytesIO(file.encode())
        asset = await run_in_threadpool(
            context.registry.add_asset, account, finetune.id, file_name, source, base
        )
    # A re-upload replaces the files: no cache may keep serving the old weights.
    _forget(context, finetune.id)
    return success_response(asset.to_api())


def _base_model(context: AppContext, model: str) -> ModelInfo:
    return context.backends[catalog.resolve(model, context.backends.keys(), lora=True)].info


def _upload_part_limit(context: AppContext) -> int:
    return context.registry.limits.max_file_bytes


def _forget(context: AppContext, finetune_id: str) -> None:
    for backend in context.distinct_backends():
        backend.forget_adapter(finetune_id)
