"""`rtlocal serve`: a thin Typer command over rtlocal.server (which needs the `serve` extra)."""

import os
import sys
from typing import Annotated, Optional

import typer

from rtlocal.cli.flags import BiasOpt, CalibOpt, CtxOpt, GpuOpt, ModelOpt, ModeOpt, StrictOpt, ThreadsOpt, ThresholdOpt
from rtlocal.errors import RtlocalError

API_KEY_ENV = "RTLOCAL_API_KEY"


def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback exposes the model to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).", min=0, max=65535)] = 8080,
    parallel: Annotated[int, typer.Option("--parallel", help="Requests generated at once (slots; the threads are split between them).", min=1, max=64)] = 1,
    queue: Annotated[int, typer.Option("--queue", help="Requests that may wait for a slot; beyond them: 503 with Retry-After.", min=0)] = 64,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help=f"Require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}).")] = None,
    strictness: StrictOpt = None,
    threshold: ThresholdOpt = None,
    bias: BiasOpt = None,
    mode: ModeOpt = "threshold",
    calibration: CalibOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Answer length for requests that set none (capped by the context).", min=1)] = 512,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body in bytes (beyond: 413).", min=1024)] = 1 << 20,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level: warning, info, debug.")] = "warning",
    threads: ThreadsOpt = None,
    ctx: CtxOpt = None,
    n_gpu_layers: GpuOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with per-request refusal control."""
    try:
        from rtlocal import server as srv
    except ImportError as e:
        raise RtlocalError(f"rtlocal serve needs the 'serve' extra ({e.name} is not installed): pip install 'rtlocal[serve]'") from None

    key = api_key or os.environ.get(API_KEY_ENV) or None
    sock = srv.bind(host, port)  # a taken port fails here, before the model loads
    try:
        server = srv.open_server(
            model, parallel=parallel, threads=threads, ctx=ctx, gpu=n_gpu_layers, strictness=strictness,
            threshold=threshold, bias=bias, mode=mode, calibration=calibration, api_key=key, queue_size=queue,
            max_tokens=max_tokens, max_body=max_body,
        )
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    where = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}/v1"
    engine = server.engine
    tokens = f"{len(engine.refusal.categories)} refusal categories" if engine.refusal.present else "no refusal tokens (plain model)"
    print(f"rtlocal serve: {engine.path.name} ({tokens}) on {where} · {parallel} slot(s) × {engine.llm.n_threads} thread(s) · "
          f"queue {queue} · context {engine.n_ctx}" + (" · API key required" if key else ""), file=sys.stderr, flush=True)
    if not srv.is_loopback(host) and not key:
        print("warning: listening beyond this machine without an API key (--api-key)", file=sys.stderr, flush=True)
    try:
        srv.serve_forever(server, sock, log_level=log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping is how a server ends
        pass
    print("rtlocal serve: stopped", file=sys.stderr, flush=True)


