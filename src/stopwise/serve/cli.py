"""`stopwise serve encoder`: serve saved exit heads over HTTP. Importing this module never imports torch.

``stopwise serve`` stays the chat server (``stopwise serve --model smollm2``, or ``stopwise serve
chat ...``, from :mod:`stopwise.sampling.cli`); this module adds the ``encoder`` subcommand to the
same ``serve`` parser, creating that parser when the chat server is not installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from stopwise._errors import StopwiseError

SERVE_HELP = "serve a model over HTTP on the loopback interface: chat (default) or encoder"
SERVE_DESCRIPTION = ("Serve a local model over HTTP. `stopwise serve [options]` and `stopwise serve chat [options]` "
                     "run the OpenAI-compatible chat server; `stopwise serve encoder --heads DIR` runs the "
                     "early-exit classifier with dynamic batching. Give a subcommand's options after its name.")
TOKEN_ENV = "STOPWISE_SERVE_TOKEN"


def serve_subcommands(subparsers: Any) -> tuple[argparse.ArgumentParser, Any]:
    """The ``serve`` parser and its subcommands, created here if no other adapter made them yet."""
    parser: argparse.ArgumentParser | None = subparsers.choices.get("serve")
    if parser is None:
        parser = subparsers.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION)
        parser.set_defaults(func=_need_subcommand)  # the chat server's flat form replaces this when installed
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if action is None:
        action = parser.add_subparsers(dest="serve_command", title="subcommands", required=False)
    return parser, action


def _need_subcommand(args: argparse.Namespace) -> int:
    raise StopwiseError("The 'serve' command needs a subcommand here: stopwise serve encoder --heads DIR.")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}. Got {text!r} instead.") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}. Got {text!r} instead.")
        return value

    return parse


def add_encoder_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "encoder", help="serve early-exit classifier heads (POST /v1/classify) with dynamic batching",
        description="Serve exit heads saved by `stopwise encoder fit` (or save_pretrained): POST /v1/classify "
                    "with {\"texts\": [...]} answers labels, probabilities, exit layer, cost and certificate id; "
                    "GET /health; GET /metrics (Prometheus). Requests are batched dynamically; a full queue "
                    "answers 503 with Retry-After; SIGTERM answers every accepted request, within "
                    "--shutdown-timeout.")
    p.add_argument("--heads", required=True, metavar="DIR", help="directory of saved exit heads (config + weights)")
    p.add_argument("--base", default=None,
                   help="base model: bundled name or local directory (default: the base named in the heads config)")
    p.add_argument("--certificate", default=None, metavar="JSON",
                   help="certificate deciding the exits (default: the one saved with the heads, if any)")
    p.add_argument("--no-stopping", action="store_true",
                   help="run every layer for every text (the bare model), ignoring any certificate")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on /v1 and /metrics (default: ${TOKEN_ENV} if set)")
    p.add_argument("--max-batch-size", type=_positive(int), default=32, help="most texts per dynamic batch (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="longest wait for a batch to fill after its first request (default 5, or a quarter of "
                        "--latency-slo-ms)")
    p.add_argument("--latency-slo-ms", type=_positive(float), default=None,
                   help="target latency: sets --max-wait-ms to a quarter of it, leaving the rest to queueing and "
                        "compute")
    p.add_argument("--max-queue", type=_positive(int), default=1024,
                   help="most texts waiting for a batch; beyond it requests get 503 + Retry-After (default 1024)")
    p.add_argument("--max-texts", type=_positive(int), default=256, help="most texts in one request (default 256)")
    p.add_argument("--max-body-bytes", type=_positive(int), default=1 << 20,
                   help="largest request body in bytes, refused with 413 while streaming (default 1048576)")
    p.add_argument("--timeout", type=_positive(float), default=30.0,
                   help="seconds a request may wait in the queue before a 503 (default 30)")
    p.add_argument("--shutdown-timeout", type=_positive(float), default=10.0,
                   help="seconds SIGTERM waits for accepted requests before exiting (default 10)")
    p.add_argument("--threads", type=_positive(int), default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_serve_encoder)
    return p


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The classifier and the certificate the arguments name (None: stopping off)."""
    import stopwise as sw

    # Imported here, not at module level: `stopwise --help` must not load torch.
    from stopwise import encoder
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    clf = encoder.EarlyExitClassifier.from_pretrained(args.base, args.heads)
    if args.no_stopping:
        return clf, None
    cert = sw.Certificate.load(args.certificate) if args.certificate else clf.certificate
    return clf, cert


def cmd_serve_encoder(args: argparse.Namespace) -> int:
    from stopwise.serve.app import create_app
    from stopwise.serve.runner import check_host, run

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    check_host(args.host, token=token)  # before loading any model
    if args.max_wait_ms is not None and not 0 <= args.max_wait_ms < 60_000:
        raise StopwiseError(f"The '--max-wait-ms' option must be in [0, 60000). Got {args.max_wait_ms} instead.")
    wait = args.max_wait_ms if args.max_wait_ms is not None else (
        args.latency_slo_ms / 4 if args.latency_slo_ms is not None else 5.0)
    clf, cert = load(args)
    app = create_app(clf, cert, max_batch_size=args.max_batch_size, max_wait_ms=wait, max_queue=args.max_queue,
                     max_texts=args.max_texts, max_body_bytes=args.max_body_bytes, timeout_s=args.timeout,
                     shutdown_timeout_s=args.shutdown_timeout, token=token)
    print(f"stopwise serve encoder: {clf.base_name}, {len(clf.class_names)} classes, "
          f"{'certificate λ=' + format(cert.lam, '.4g') if cert is not None and cert.lam is not None else 'stopping off'}"
          f", http://{args.host}:{args.port}/v1/classify", file=sys.stderr, flush=True)
    run(app, host=args.host, port=args.port, shutdown_timeout_s=args.shutdown_timeout,
        on_exit=[app.state.batcher.hurry])
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``stopwise serve encoder`` (to the chat server's ``serve`` parser when it exists)."""
    _, sub = serve_subcommands(subparsers)
    if "encoder" not in sub.choices:
        add_encoder_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """``python -m stopwise.serve.cli encoder --heads DIR ...`` (the same as ``stopwise serve encoder``)."""
    parser = argparse.ArgumentParser(prog="stopwise")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    if not hasattr(args, "func"):
        parser.error("choose a subcommand: stopwise serve encoder --heads DIR")
    try:
        return int(args.func(args))
    except StopwiseError as exc:
        print(f"stopwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
