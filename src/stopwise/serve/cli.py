"""`stopwise serve encoder`: serve saved exit heads over HTTP. Importing this module never imports torch.

``stopwise serve`` stays the chat server (``stopwise serve --model smollm2``, or ``stopwise serve
chat ...``, from :mod:`stopwise.sampling.cli`); this module adds the ``encoder`` subcommand to the
same ``serve`` parser, creating that parser when the chat server is not installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from stopwise._errors import StopwiseError

SERVE_HELP = "serve a model over HTTP on the loopback interface: chat (default) or encoder"
SERVE_DESCRIPTION = ("Serve a local model over HTTP. `stopwise serve [options]` and `stopwise serve chat [options]` "
                     "run the OpenAI-compatible chat server; `stopwise serve encoder --heads DIR` runs the "
                     "early-exit classifier with dynamic batching. Give a subcommand's options after its name.")
TOKEN_ENV = "STOPWISE_SERVE_TOKEN"
RECALIBRATE_EPILOG = """online recalibration (--recalibrate): a share --shadow-rate of the texts (each independently,
at random) is answered by the full model and recorded through every layer; the last --window of them
form a sliding window (the final layer is the reference: no labels). Every --recalibrate-every new
shadowed texts, a Learn-then-Test calibration on the window (risk gap, --epsilon) replaces the
certificate atomically. After every shadowed batch the lambda in use is tested on the window; if the
window no longer certifies it, a fallback recalibrates at once (the full model when nothing certifies)
and says so in the log (warning) and /metrics (stopwise_fallbacks_total, stopwise_policy_certified).

What the guarantee covers: recalibration r tests at delta_r = delta * 6 / (pi^2 r^2), so the delta
spent over the server's life sums to at most --delta: with probability >= 1 - delta every certificate
issued online has gap <= epsilon on the distribution its window came from. That speaks for the next
requests only if the stream is stationary over the window; drift faster than the window fills (about
window / shadow-rate texts) is not covered, nor are errors of the full model itself (the gap is
disagreement with it, not accuracy). Shadowed texts are answered exactly (full model). The fallback
test spends no delta: failing it only adds layers. Size --window for epsilon: nothing certifies on fewer
than min_calibration_size(epsilon, delta_r) texts (epsilon 0.01, delta 0.1: 279 at r = 1, 737 at r = 10,
1196 at r = 100); a smaller window falls back to the full model."""


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
        "encoder", epilog=RECALIBRATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, help="serve early-exit classifier heads (POST /v1/classify) with dynamic batching",
        description="Serve exit heads saved by `stopwise encoder train` (or save_pretrained): POST /v1/classify "
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
    g = p.add_argument_group("online recalibration")
    g.add_argument("--recalibrate", action="store_true",
                   help="shadow a share of the texts through every layer and recalibrate online (see below)")
    g.add_argument("--shadow-rate", type=_positive(float), default=0.05,
                   help="share of texts shadowed (answered by the full model), in (0, 1) (default 0.05)")
    g.add_argument("--window", type=_positive(int), default=2000,
                   help="shadowed texts kept in the sliding window (default 2000)")
    g.add_argument("--recalibrate-every", type=_positive(int), default=200,
                   help="new shadowed texts between scheduled recalibrations (default 200)")
    g.add_argument("--recalibrate-every-s", type=_positive(float), default=None,
                   help="also recalibrate after this many seconds with new shadowed texts (default: off)")
    g.add_argument("--epsilon", type=_positive(float), default=None,
                   help="gap to certify online (default: the certificate's, else 0.01)")
    g.add_argument("--delta", type=_positive(float), default=None,
                   help="total delta spent over all recalibrations (default: the certificate's, else 0.1)")
    g.add_argument("--rule", default=None, help="rule family to calibrate (default: the certificate's, else max_prob)")
    g.add_argument("--shadow-seed", type=int, default=0, help="seed of the shadow draw (default 0)")
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


def make_recalibrator(args: argparse.Namespace, cert: Any | None) -> Any:
    """The :class:`~stopwise.serve.recalibrate.Recalibrator` the flags describe (defaults from ``cert``)."""
    from stopwise.core.rules import rule_from_config
    from stopwise.serve.recalibrate import Recalibrator

    if not 0 < args.shadow_rate < 1:
        raise StopwiseError(f"The '--shadow-rate' option must be in (0, 1). Got {args.shadow_rate} instead.")
    rule: Any = args.rule if args.rule is not None else (
        rule_from_config(cert.rule).with_lam(None) if cert is not None else "max_prob")
    epsilon = args.epsilon if args.epsilon is not None else (cert.epsilon if cert is not None else 0.01)
    delta = args.delta if args.delta is not None else (
        cert.delta if cert is not None and cert.delta is not None else 0.1)
    return Recalibrator(rule=rule, epsilon=float(epsilon), delta=float(delta), shadow_rate=args.shadow_rate,
                        window=args.window, every=args.recalibrate_every, every_s=args.recalibrate_every_s,
                        seed=args.shadow_seed)


def cmd_serve_encoder(args: argparse.Namespace) -> int:
    from stopwise.serve.app import create_app
    from stopwise.serve.runner import check_host, run

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    check_host(args.host, token=token)  # before loading any model
    if args.max_wait_ms is not None and not 0 <= args.max_wait_ms < 60_000:
        raise StopwiseError(f"The '--max-wait-ms' option must be in [0, 60000). Got {args.max_wait_ms} instead.")
    wait = args.max_wait_ms if args.max_wait_ms is not None else (
        args.latency_slo_ms / 4 if args.latency_slo_ms is not None else 5.0)
    if args.recalibrate and args.no_stopping:
        raise StopwiseError("The '--recalibrate' option recalibrates early exits; it cannot be combined with "
                            "'--no-stopping'. Got both instead.")
    if args.recalibrate:  # the fallback's warning and each recalibration's line reach stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    clf, cert = load(args)
    recalibrator = make_recalibrator(args, cert) if args.recalibrate else None
    app = create_app(clf, cert, recalibrator=recalibrator, max_batch_size=args.max_batch_size, max_wait_ms=wait, max_queue=args.max_queue,
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
    """``python -m stopwise.serve.cli encoder --heads DIR ...``: the same as ``stopwise serve encoder``."""
    from stopwise.cli import main as stopwise_main

    return stopwise_main(["serve", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
