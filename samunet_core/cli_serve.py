"""`samunet serve`: the engine as an HTTP server for the Slicer module and `samunet segment --server`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from samunet_core.registry import DEFAULT_MODEL
    from samunet_core.runtime import RUNTIME_CHOICES

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer "
                        "only; 0.0.0.0 for every interface, with a token)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="file holding the bearer token clients must send; created with a random token if it "
                             "does not exist")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="accept requests without a token (refused unless --host is a loopback address)")
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu or cuda")
    parser.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES, help="encoder runtime (default auto)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry model (default: {DEFAULT_MODEL})")
    parser.add_argument("--max-sessions", type=int, default=16, help="volumes held at once (default 16)")
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest upload accepted (default 512)")
    parser.add_argument("--idle-timeout", type=float, default=1800, metavar="S",
                        help="close sessions idle for S seconds (default 1800)")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")


def token_from_file(path: str) -> str:
    """The token in `path`; a new random one is written there (mode 600) when the file does not exist."""
    import os
    import secrets
    from pathlib import Path

    from samunet_core.errors import InputError

    file = Path(path)
    if not file.exists():
        token = secrets.token_urlsafe(32)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        print(f"samunet serve: wrote a new token to {file} (give this file to clients)", file=sys.stderr)
        return token
    token = file.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise InputError(f"the token in {file} is shorter than 16 characters; use a long random one")
    return token


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from samunet_core.errors import InputError
    from samunet_core.serve.app import ServeConfig, create_app
    from samunet_core.serve.server import check_host

    check_host(args.host, args.insecure_no_auth)
    if args.token_file is None and not args.insecure_no_auth:
        raise InputError("give --token-file FILE (created with a random token if missing), or --insecure-no-auth on "
                         "127.0.0.1")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise InputError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    config = ServeConfig(model=args.model, device=args.device, runtime=args.runtime,
                         token=token_from_file(args.token_file) if args.token_file else None,
                         insecure_no_auth=args.insecure_no_auth, max_sessions=args.max_sessions,
                         max_upload_bytes=int(args.max_upload_mb * 1024**2), idle_timeout_s=args.idle_timeout)
    app = create_app(config)
    state = app.state.samunet
    print(f"samunet serve: {state.predictor.model_id} on {state.predictor.device} ({state.predictor.runtime}), "
          f"listening on {'https' if args.ssl_certfile else 'http'}://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile)
    return 0
