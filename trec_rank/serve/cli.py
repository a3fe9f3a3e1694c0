"""The `serve` subcommand: an exported artifact behind HTTP JSON (registered by trec_rank/cli.py)."""

from __future__ import annotations

import argparse
import socket


def _serve(args: argparse.Namespace) -> None:
    for name, value, low in (("--port", args.port, 1), ("--max-batch-rows", args.max_batch_rows, 1),
                             ("--max-wait-ms", args.max_wait_ms, 0)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, got {args.port}")
    import uvicorn

    from trec_rank.export.artifact import load_artifact
    from trec_rank.serve.app import create_app

    sock = _listen(args.host, args.port)  # a taken port fails before the model loads
    try:
        artifact = load_artifact(args.artifact)
    except BaseException:
        sock.close()
        raise
    app = create_app(artifact, args.max_batch_rows, args.max_wait_ms)
    print(f"serving {args.artifact} (outputs: {', '.join(artifact.outputs)}) on http://{args.host}:{args.port} "
          "(POST /predict, GET /health, GET /metadata; Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a ValueError naming the address (taken, or not this machine's).

    TCP_NODELAY on the listener, inherited by every accepted connection: asyncio sets it itself only on
    sockets created with proto IPPROTO_TCP, which `create_server` does not, and without it each reply
    waited ~40 ms for the client's delayed ACK (Nagle), on every request."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except OSError as err:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    """Add `trec-rank serve` to the top-level subparsers."""
    s = sub.add_parser("serve", help="answer HTTP JSON requests with an artifact from `trec-rank export`: POST "
                                     "/predict, GET /health, GET /metadata (docs/serving.md)")
    s.add_argument("artifact", help="artifact directory written by `trec-rank export`")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; 0.0.0.0 "
                   "exposes the unauthenticated endpoint to the network)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--max-batch-rows", type=int, default=4096, help="rows per model call, also the most rows "
                   "one request may send (default: 4096)")
    s.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a request may wait for others to "
                   "share its model call when the server is idle (default: 2; under load batches form anyway)")
    s.set_defaults(func=_serve)
