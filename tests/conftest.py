"""Live servers for the API, client, SDK and CLI tests: real uvicorn on 127.0.0.1, real SQLite
registries in temporary directories, the real engine (random:tiny; the embedded SmolLM2 only for
the few tests that need a real chat model). One of each per session: loading is the slow part."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loraserve.api import BackgroundServer, ServerSettings, create_app
from loraserve.registry import Registry, RegistryLimits

# Fixtures shared by test modules in other folders (a conftest.py there would shadow this one's name).
pytest_plugins = ["qlinear_helpers", "redis_helpers"]

# random:tiny served under the catalog's Llama-2 id, with the Llama-2 template as `serve` would pick.
LORA_MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
BASE_NAME = "@cf/meta-llama/llama-2-7b-chat-hf"  # routes to LORA_MODEL when a `lora` is given
NO_LORA_MODEL = "@cf/test/tiny-base"  # the same weights under an id that takes no adapters
ONE_SLOT_MODEL = "@cf/test/one-slot-lora"  # an engine that runs one request and queues one more
EMBEDDED_MODEL = "@cf/huggingfacetb/smollm2-135m-instruct"
RUN_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Account:
    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class LiveServer:
    base_url: str
    registry: Registry
    backends: dict[str, Any]
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def new_account(self, prefix: str = "acct") -> Account:
        account_id = f"{prefix}-{next(self._ids)}"
        return Account(account_id, self.registry.create_token(account_id))

    def ai_url(self, account: Account | str) -> str:
        account_id = account if isinstance(account, str) else account.id
        return f"{self.base_url}/client/v4/accounts/{account_id}/ai"

    def run_url(self, account: Account | str, model: str = LORA_MODEL) -> str:
        return f"{self.ai_url(account)}/run/{model}"


def _load(source: str, **engine_options: Any) -> Any:
    from loraserve import catalog
    from loraserve.engine.config import EngineConfig
    from loraserve.engine.loader import load_backend

    template = (
        catalog.chat_template(catalog.template_kind(LORA_MODEL)) if source.startswith("random:") else None
    )
    return load_backend(source, EngineConfig(**engine_options), chat_template=template)


@pytest.fixture(scope="session")
def tiny_backend() -> Iterator[Any]:
    backend = _load("random:tiny", max_num_seqs=8)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_backend: Any) -> Iterator[LiveServer]:
    """The main server. No rate limit here (the suite would trip it); `strict_server` tests limits."""
    registry = Registry.open(tmp_path_factory.mktemp("registry"))
    backends = {LORA_MODEL: tiny_backend, NO_LORA_MODEL: tiny_backend}
    app = create_app(registry, backends, ServerSettings(rate_limit_per_minute=0))
    with BackgroundServer(app) as live:
        yield LiveServer(live.base_url, registry, backends)
    registry.close()


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory: pytest.TempPathFactory, tiny_backend: Any) -> Iterator[LiveServer]:
    """Small limits everywhere: rate 3/min, /run bodies 2 KiB, uploads 4 KiB, 2 finetunes an account,
    and a 0.5 s run timeout."""
    registry = Registry.open(
        tmp_path_factory.mktemp("strict-registry"),
        limits=RegistryLimits(max_file_bytes=4096, max_finetunes_per_account=2),
    )
    backends = {LORA_MODEL: tiny_backend}
    settings = ServerSettings(
        rate_limit_per_minute=3, max_run_body_bytes=2048, request_timeout_s=RUN_TIMEOUT_S
    )
    with BackgroundServer(create_app(registry, backends, settings)) as live:
        yield LiveServer(live.base_url, registry, backends)
    registry.close()


@pytest.fixture(scope="session")
def one_slot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """An engine that runs one request and queues one more: the third is over capacity (3040)."""
    backend = _load("random:tiny", max_num_seqs=1, max_queue=1)
    registry = Registry.open(tmp_path_factory.mktemp("one-slot-registry"))
    backends = {ONE_SLOT_MODEL: backend}
    app = create_app(registry, backends, ServerSettings(rate_limit_per_minute=0))
    with BackgroundServer(app) as live:
        yield LiveServer(live.base_url, registry, backends)
    registry.close()
    backend.shutdown()


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The shipped SmolLM2-135M-Instruct: a real chat model, for text that must make sense (emoji, CJK)."""
    backend = _load("embedded")
    registry = Registry.open(tmp_path_factory.mktemp("embedded-registry"))
    backends = {EMBEDDED_MODEL: backend}
    app = create_app(registry, backends, ServerSettings(rate_limit_per_minute=0))
    with BackgroundServer(app) as live:
        yield LiveServer(live.base_url, registry, backends)
    registry.close()
    backend.shutdown()


@pytest.fixture
def account(server: LiveServer) -> Account:
    return server.new_account()


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_backend: Any) -> Callable[..., Path]:
    """`peft_adapter(r=8, targets=(...))`: a real PEFT adapter folder for the tiny model's shapes.

    Built with transformers + peft on a LlamaForCausalLM whose projections have exactly the
    shapes the engine reports, and with random (not zero) B matrices so the adapter changes outputs.
    """
    made: dict[tuple[Any, ...], Path] = {}

    def build(
        r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), hidden_delta: int = 0
    ) -> Path:
        key = (r, targets, hidden_delta)
        if key not in made:
            made[key] = _peft_adapter(
                tmp_path_factory.mktemp("adapter"), tiny_backend.info, r, targets, hidden_delta
            )
        return made[key]

    return build


def _peft_adapter(folder: Path, info: Any, r: int, targets: tuple[str, ...], hidden_delta: int) -> Path:
    with warnings.catch_warnings():
        # transformers/peft deprecation chatter is not ours to fix; the suite turns warnings into errors.
        warnings.simplefilter("ignore")
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        shapes = info.lora_shapes
        hidden, q_size = shapes["q_proj"]
        kv_size = shapes["k_proj"][1]
        config = LlamaConfig(
            vocab_size=info.vocab_size,
            hidden_size=hidden + hidden_delta,  # a delta makes an adapter for some other model
            intermediate_size=shapes["gate_proj"][1],
            num_hidden_layers=info.num_layers,
            num_key_value_heads=1,
            head_dim=kv_size,
            num_attention_heads=q_size // kv_size,
        )
        torch.manual_seed(0)
        model = get_peft_model(
            LlamaForCausalLM(config),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                       task_type="CAUSAL_LM"),
        )
        model.save_pretrained(str(folder))
    return folder


def create_finetune(
    server: LiveServer, account: Account, name: str, folder: Path | None = None, *,
    model: str = LORA_MODEL, public: bool = False,
) -> dict[str, Any]:
    """POST /finetunes, then upload the folder's two files as wrangler does; returns the finetune."""
    import httpx

    response = httpx.post(
        f"{server.ai_url(account)}/finetunes", headers=account.headers,
        json={"model": model, "name": name, "description": "", "public": public},
    )
    assert response.status_code == 200, response.text
    finetune: dict[str, Any] = response.json()["result"]
    for file_name in ("adapter_config.json", "adapter_model.safetensors") if folder else ():
        assert folder is not None
        upload = httpx.post(
            f"{server.ai_url(account)}/finetunes/{finetune['id']}/finetune-assets", headers=account.headers,
            data={"file_name": file_name}, files={"file": ("blob", (folder / file_name).read_bytes())},
        )
        assert upload.status_code == 200, upload.text
    return finetune


def ok(response: Any) -> Any:
    """The `result` of a successful Workers AI envelope."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    return body["result"]


def fails(response: Any, status: int, code: int) -> str:
    """The message of a failed Workers AI envelope with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["result"] is None, body
    error = body["errors"][0]
    assert error["code"] == code
    message: str = error["message"]
    return message


def upload(server: LiveServer, account: Account, ref: str, file_name: str, content: bytes) -> Any:
    """One `finetune-assets` upload, as wrangler sends it (a part named "blob")."""
    import httpx

    return httpx.post(f"{server.ai_url(account)}/finetunes/{ref}/finetune-assets", headers=account.headers,
                      data={"file_name": file_name}, files={"file": ("blob", content)})
