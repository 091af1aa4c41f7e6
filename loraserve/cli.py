"""The `loraserve` command: serve, tokens, finetunes (wrangler's verbs), run, quantize, bench, loadtest.

Only `serve`, `quantize` (and `bench`) load the engine, lazily: every other command stays torch-free and
quick.
Human-facing output goes to stderr; stdout carries only what a script would capture.
The `token` and `finetune` groups are in cli_accounts.py; what the modules share, in cli_common.py.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loraserve import catalog
from loraserve.cli_accounts import finetune_app, token_app
from loraserve.cli_common import (
    DEFAULT_DATA_DIR,
    AccountId,
    BaseUrl,
    DatabaseUrl,
    DataDir,
    Token,
    err,
    fail,
)
from loraserve.client import DEFAULT_BASE_URL, APIError, Client, RunStream
from loraserve.engine.config import Quantization  # torch-free, as the whole config module

if TYPE_CHECKING:
    pass

app = typer.Typer(
    no_args_is_help=True, add_completion=False,
    help="loraserve: a self-hosted Workers AI server for one base LLM and many LoRA finetunes.",
)
app.add_typer(token_app, name="token")
app.add_typer(finetune_app, name="finetune")


def main() -> None:
    app()


# serve ---------------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8787,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="ID=SOURCE (a local HF dir, a .gguf, 'embedded', 'random:tiny' or a HF repo "
                 "id), or a catalog ID alone. Repeatable. Default: the embedded SmolLM2.",
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    adapter_store: Annotated[
        str | None,
        typer.Option(help="Keep adapter files in a shared store: s3://BUCKET/PREFIX (endpoint and "
                          "credentials from the AWS_* environment), file:///PATH or memory://PREFIX; the "
                          "data dir then caches them. Default: the data dir alone."),
    ] = None,
    rate_limit: Annotated[int | None, typer.Option(help="Runs per account per minute; 0 disables.")] = None,
    redis_url: Annotated[str | None, typer.Option(
        envvar="LORASERVE_REDIS_URL", help="Count the rate limit in this Redis (redis://, rediss://, unix://),"
        " shared by every server given it; default: in this process.")] = None,
    max_rank: Annotated[int | None, typer.Option(help="Largest LoRA rank accepted at upload.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds a /run may take, queueing included.")] = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, help="Requests generated together (default 64).")
    ] = None,
    max_queue: Annotated[
        int | None,
        typer.Option(min=1, help="Requests waiting beyond the batch; more get 429/3040 (default 256)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default: cpu).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto, float32, bfloat16, float16, or gguf: a GGUF file's own "
                                      "quantization (Q8_0, Q4_0, Q4_1), multiplied as stored on the CPU "
                                      "(default: auto = float32 on CPU, bfloat16 on CUDA).")
    ] = None,
    lora_dtype: Annotated[
        str | None,
        typer.Option(help="auto, float32 or float16: adapter weights in half precision halve what the CPU "
                          "LoRA kernel reads each step, at fp16's rounding (default: auto = float16 beside "
                          "quantized weights, else the model's dtype)."),
    ] = None,
    kv_cache_bytes: Annotated[
        int | None,
        typer.Option(min=0, help="Memory for the KV cache, allocated at start: more holds more requests at "
                                 "once (default 0: every batch slot's full window, at most 1 GiB or 8192 "
                                 "tokens on the CPU, whichever is more, and a quarter of the memory)."),
    ] = None,
    kv_dtype: Annotated[
        str | None,
        typer.Option(help="auto, float32 or float16: the KV cache's elements on the CPU (default: auto = "
                          "float16 for a GGUF file's blocks, the compute dtype otherwise)."),
    ] = None,
    adaptive_threads: Annotated[
        bool,
        typer.Option("--adaptive-threads/--fixed-threads",
                     help="CPU: step with one thread fewer while the engine's threads wait for cores other "
                          "work holds, and take it back once a core stays idle; --fixed-threads: always "
                          "LORASERVE_THREADS (default: all cores)."),
    ] = True,  # a server's choice; the engine library's own default (EngineConfig) is fixed
    quantize: Annotated[
        Quantization | None,
        typer.Option(help="Quantize a Hugging Face directory's weights at load to GGUF blocks, served "
                          "with --dtype gguf (the default with it): as `loraserve quantize --type` writes "
                          "them (q4_k_m / q5_k_m: llama.cpp's Q4_K_M / Q5_K_M mixes); norms stay float. CPU "
                          "only."),
    ] = None,
    prefix_caching: Annotated[
        bool | None,
        typer.Option(help="Reuse the K/V of prompt prefixes an account sent before (never across accounts); "
                          "on by default."),
    ] = None,
    metrics_token: Annotated[
        str | None, typer.Option(envvar="LORASERVE_METRICS_TOKEN",
                                 help="Bearer token GET /metrics requires (its series name finetune ids).")
    ] = None,
    engine_process: Annotated[
        bool | None,
        typer.Option("--engine-process/--in-process",
                     help="Run each model's engine in a process of its own, restarted if it dies, while this "
                          "one keeps HTTP, templates, tokenizers and streaming (the default on one machine); "
                          "--in-process: one process for both."),
    ] = None,
    engine_nice: Annotated[
        int | None,
        typer.Option(min=0, max=19, help="CPU priority (nice) of the engine processes below this one's, so "
                                         "that HTTP never waits behind a step (default: 5; 0: equal)."),
    ] = None,
    replicas: Annotated[int | None, typer.Option(
        min=1, help="Run N engine replicas per model on Ray Serve (pip install 'loraserve[cluster]'), "
                    "behind Serve's HTTP proxy on --host/--port; a Ray is started here unless --address.")
    ] = None,
    address: Annotated[str | None, typer.Option(
        help="With --replicas: join this Ray cluster (HOST:PORT or ray://...).")] = None,
    gateways: Annotated[int | None, typer.Option(
        min=1, help="With --replicas: run M gateway replicas (HTTP, auth, tokenizing; Serve's proxy spreads "
                    "requests over them).")] = None,
    replica_cache_bytes: Annotated[int | None, typer.Option(
        min=0, help="With --replicas and --adapter-store: bytes of adapters each machine's engine replicas "
                    "keep fetched; the least recently used go beyond (default 32 GiB; 0: no limit).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the Workers AI API for the given models."""
    from loraserve.api import ServerSettings
    from loraserve.registry import RegistryLimits
    from loraserve.registry.store import AdapterStoreConfig

    try:
        sources = [catalog.parse_model_arg(arg) for arg in model or [catalog.DEFAULT_MODEL.id]]
        located = {s.id: catalog.locate(s.source) for s in sources}
        settings = ServerSettings(**_given(rate_limit_per_minute=rate_limit, request_timeout_s=timeout,
                                           metrics_token=metrics_token, redis_url=redis_url))
        limits = RegistryLimits(**_given(max_rank=max_rank))
        store = AdapterStoreConfig(adapter_store) if adapter_store is not None else None
    except ValueError as exc:  # ModelSourceError, or a setting out of range
        raise fail(str(exc), 2) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Before the slow model loading: fail fast.
    from loraserve.cli_serve import EngineSplit, open_registry, serve_models

    registry = open_registry(data_dir, database_url, limits, store)
    from loraserve.engine.config import EngineConfig

    try:
        if quantize is not None and dtype is None:
            dtype = "gguf"  # the only dtype quantized weights are served in
        engine_options = _given(max_num_seqs=max_batch, max_queue=max_queue, prefix_caching=prefix_caching,
                                device=device, dtype=dtype, lora_dtype=lora_dtype, quantize=quantize,
                                kv_cache_bytes=kv_cache_bytes, kv_dtype=kv_dtype,
                                adaptive_threads=adaptive_threads)
        engine_config = EngineConfig(**engine_options)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if replica_cache_bytes is not None and replicas is None:
        raise fail("--replica-cache-bytes needs --replicas", 2)
    if replicas is not None or address is not None or gateways is not None:  # Ray Serve: loraserve/cluster/
        from loraserve.cluster.local import serve_from_cli  # torch-free; ray: only there

        registry.close()
        cluster = _given(models=tuple(model) if model else None, data_dir=data_dir, database_url=database_url,
                         adapter_store=adapter_store, gateways=gateways, engine=engine_options,
                         server=settings, limits=limits, replica_cache_bytes=replica_cache_bytes)
        if replica_cache_bytes == 0:  # None, which _given takes for an option left out
            cluster["replica_cache_bytes"] = None
        if engine_nice is not None:
            raise fail("--engine-nice is for engine processes on one machine, not --replicas", 2)
        serve_from_cli(replicas, address, bool(engine_process), host, port, log_level, **cluster)
        return

    if engine_process is False and engine_nice is not None:
        raise fail("--engine-nice needs the engine process (not --in-process)", 2)
    split = EngineSplit(engine_nice) if engine_process is not False else None
    serve_models(registry, sources, located, engine_config, split, settings, host, port, log_level)


def _given(**values: Any) -> dict[str, Any]:
    """Options left out keep the defaults of the config classes (which own them)."""
    return {k: v for k, v in values.items() if v is not None}


# run -----------------------------------------------------------------------------------------------


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Model id, e.g. @cf/meta-llama/llama-2-7b-chat-hf-lora.")],
    account: AccountId,
    token: Token,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    prompt: Annotated[str | None, typer.Option(help="An unscoped prompt.")] = None,
    messages: Annotated[str | None, typer.Option(help='JSON: [{"role": "user", "content": "..."}]')] = None,
    lora: Annotated[str | None, typer.Option(help="Finetune id or name.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come.")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens to generate at most.")] = None,
    raw: Annotated[bool, typer.Option(help="Send the prompt without the chat template.")] = False,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same input: same output.")] = None,
) -> None:
    """Run a model on a running server and print its answer."""
    if (prompt is None) == (messages is None):
        raise fail("give exactly one of --prompt and --messages", 2)
    inputs: dict[str, Any] = _given(lora=lora, max_tokens=max_tokens, temperature=temperature, seed=seed)
    if prompt is not None:
        inputs.update(prompt=prompt, raw=raw)
    else:
        try:
            inputs["messages"] = json.loads(messages or "")
        except ValueError:
            raise fail("--messages must be JSON", 2) from None
    with Client(account, token, base_url) as client:
        try:
            if stream:
                with client.stream(model, inputs) as deltas:
                    for text in deltas:
                        print(text, end="", flush=True)
                    print()
                    usage = deltas.usage
            else:
                result = client.run(model, inputs)
                assert not isinstance(result, RunStream)  # inputs do not ask to stream
                print(result["response"])
                usage = result.get("usage")
        except APIError as exc:
            raise fail(str(exc)) from None
    if usage:
        err.print(f"[dim]{usage}[/]", highlight=False)


# quantize ------------------------------------------------------------------------------------------


@app.command("quantize")
def quantize_command(
    source: Annotated[str, typer.Argument(help="A Hugging Face directory, or random:NAME[:TYPE].")],
    out: Annotated[Path, typer.Argument(help="The GGUF file to write.")],
    qtype: Annotated[
        Quantization | None,
        typer.Option("--type", help="Block type of the projections and embedding (q4_k: llama.cpp's "
                                    "Q4_K_S), or q4_k_m / q5_k_m, llama.cpp's Q4_K_M / Q5_K_M mixes; the "
                                    "head (or a tied embedding) is Q6_K but for q8_0, as llama.cpp's. "
                                    "Required but for random:NAME:TYPE, whose blocks are written as they "
                                    "are."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a quantized GGUF file that llama.cpp (and `serve --dtype gguf`) reads."""
    from loraserve.engine.weights.convert import convert  # torch: only now

    try:
        config = convert(source, out, qtype, overwrite=force)
    except (OSError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    err.print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB: {config.num_layers} layers, "
              f"hidden {config.hidden_size}, vocabulary {config.vocab_size})", highlight=False)


# bench ---------------------------------------------------------------------------------------------


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Benchmarks (all arguments go to loraserve.tools.bench.run; try `loraserve bench --help`)."""
    bench_module = importlib.import_module("loraserve.tools.bench.run")  # written elsewhere; may load torch
    raise typer.Exit(int(bench_module.main(list(ctx.args))))


# loadtest ------------------------------------------------------------------------------------------


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
    help="Overload run against a server: streaming clients, disconnects, health, leaks "
         "(`loraserve loadtest --help`).",
)
def loadtest(ctx: typer.Context) -> None:
    from loraserve.tools.loadtest import run as loadtest_module  # torch-free

    raise typer.Exit(loadtest_module.main(list(ctx.args)))


# bench-routing -------------------------------------------------------------------------------------


@app.command(
    "bench-routing",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
    help="Adapter loads and TTFT, multiplexed against power-of-two routing on a local Ray Serve, and "
         "simulated replica counts (`loraserve bench-routing --help`).",
)
def bench_routing(ctx: typer.Context) -> None:
    from loraserve.tools.routing_bench import run as routing_module  # Ray only once it runs

    raise typer.Exit(routing_module.main(list(ctx.args)))


if __name__ == "__main__":  # pragma: no cover
    main()
