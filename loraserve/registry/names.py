"""Rules for the strings users pick: finetune names, account ids, model ids, refs."""

from __future__ import annotations

import re
import uuid

from loraserve.errors import BadInput, FinetuneConflict

MAX_NAME_CHARS = 128
MAX_DESCRIPTION_CHARS = 4096
MAX_MODEL_CHARS = 256
MAX_ACCOUNT_ID_CHARS = 64
MAX_LABEL_CHARS = 200
RESERVED_NAME_PREFIX = "cf-public-"

# No "/" (names appear in URL paths), no ":" (the OpenAI face splits "model:finetune"), no spaces.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9_-]+")
_LORA_SUFFIX = "-lora"


def parse_uuid(ref: str) -> str | None:
    """The canonical form of `ref` if it parses as a UUID (in any form Python accepts), else None."""
    try:
        return str(uuid.UUID(ref))
    except (ValueError, TypeError):
        return None


def check_name(name: str) -> None:
    """A finetune name: raises BadInput (format) or FinetuneConflict (reserved)."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
        raise BadInput(f"name must be a string of 1 to {MAX_NAME_CHARS} characters")
    if not _NAME_RE.fullmatch(name):
        raise BadInput("name may only contain letters, digits, '.', '_' and '-'")
    if not name.strip("."):
        raise BadInput("name must not be only dots (it would read as a path in a URL)")
    if name.lower().startswith(RESERVED_NAME_PREFIX):
        raise FinetuneConflict(f"AiError: Bad input: name prefix '{RESERVED_NAME_PREFIX}' is reserved")
    # Refs are "id or name": a UUID-shaped name would make a lookup ambiguous.
    if parse_uuid(name) is not None:
        raise BadInput("name must not be a UUID (finetunes are looked up by id or name)")


def check_description(description: str) -> None:
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise BadInput(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")


def check_model(model: str) -> None:
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        raise BadInput(f"model must be a non-empty string of at most {MAX_MODEL_CHARS} characters")


def check_account_id(account_id: str) -> None:
    """Account ids are chosen by the operator (Cloudflare's are 32 hex digits); raises ValueError."""
    if (
        not isinstance(account_id, str)
        or not 1 <= len(account_id) <= MAX_ACCOUNT_ID_CHARS
        or not _ACCOUNT_RE.fullmatch(account_id)
    ):
        raise ValueError(
            f"account id must be 1 to {MAX_ACCOUNT_ID_CHARS} characters of letters, digits, '_' and '-'"
        )


def check_label(label: str) -> None:
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise ValueError(f"token label must be printable text of at most {MAX_LABEL_CHARS} characters")


def normalize_model(model: str) -> str:
    """The base model a model id names: "@cf/x/y" and "@cf/x/y-lora" are the same base."""
    model = model.strip().lower()
    return model.removesuffix(_LORA_SUFFIX)


def same_model(a: str, b: str) -> bool:
    return normalize_model(a) == normalize_model(b)
