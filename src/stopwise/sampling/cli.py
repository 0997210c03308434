"""`stopwise sample record|calibrate|run` and `stopwise serve [chat]`. Importing this module never imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stopwise._errors import StopwiseError


def _questions(args: argparse.Namespace) -> list[Any]:
    from stopwise.sampling.data import load_questions, math_questions

    if args.questions == "math":
        return math_questions(args.count, seed=args.data_seed)
    return load_questions(args.questions)


def _backend(args: argparse.Namespace) -> Any:
    if args.endpoint:
        from stopwise.sampling.backends import HTTPBackend

        return HTTPBackend(args.endpoint, model=args.model, timeout=args.timeout, retries=args.retries, max_n=args.max_n)
    from stopwise.sampling.local import LocalBackend

    return LocalBackend(args.model, threads=args.threads, system=args.system)


def _backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("questions", help="a JSONL question file (prompt, id, label), or 'math' for mathematics-dataset problems")
    p.add_argument("--count", type=int, default=200, help="number of 'math' problems (default 200)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--model", default="smollm2", help="bundled name or local directory; for --endpoint, the served model name")
    p.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: local model)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--max-n", type=int, default=16, help="largest n per request the endpoint accepts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extract", default="number", help="number | choice | string | marker")


def cmd_record(args: argparse.Namespace) -> int:
    from stopwise.sampling.record import convert, record

    status = record(_questions(args), _backend(args), args.output, n=args.n, model=args.model, extract=args.extract,
                    temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                    batch_questions=args.batch_questions, limit=args.limit, progress=not args.no_progress)
    trace_path = Path(args.trace or Path(args.output).with_suffix(".npz"))
    trace = convert(args.output, trace_path, n_samples=args.n, extract=None)
    print(json.dumps({**status, "trace": str(trace_path), "n": trace.n, "stages": trace.n_stages}))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from stopwise.sampling.certify import certify
    from stopwise.trace import Trace

    trace = Trace.load(args.trace)
    cert = certify(trace, args.rule, epsilon=args.epsilon, delta=args.delta, risk=args.risk)
    if args.output:
        cert.save(args.output)
    print(cert.to_json() if args.json else str(cert))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from stopwise.certificate import Certificate
    from stopwise.sampling.sampler import AdaptiveSampler, summarise

    if args.total_samples is not None:
        return _run_budget(args)
    rule: Any = Certificate.load(args.certificate) if args.certificate else (args.rule or "settled")
    sampler = AdaptiveSampler(_backend(args), rule, lam=args.lam, max_samples=args.max_samples, step=args.step,
                              extract=args.extract, temperature=args.temperature, max_tokens=args.max_tokens,
                              vote=args.vote, seed=args.seed)
    questions = _questions(args)
    results = sampler.arun_sync(questions) if args.endpoint else sampler.run(questions)
    _print_results(questions, results)
    print(json.dumps({"summary": summarise(results, max_samples=args.max_samples)}), file=sys.stderr)
    return 0


def _run_budget(args: argparse.Namespace) -> int:
    """`run --total-samples`: DSC's allocation of one budget across all the questions."""
    from stopwise.sampling.allocate import DifficultyAllocator, check_budget

    # The allocation has its own stop (the Beta criterion at --lam): refuse a rule it would ignore.
    if args.certificate or args.rule not in (None, "dsc"):
        got = f"--certificate {args.certificate}" if args.certificate else f"--rule {args.rule}"
        raise StopwiseError(f"The '--total-samples' option runs DSC's budget allocation, which stops by the "
                            f"Beta criterion at --lam; it allows only --rule dsc. Got {got} instead.")
    questions = _questions(args)
    check_budget(args.total_samples, pre=args.pre, n_questions=len(questions))  # before loading a model
    allocator = DifficultyAllocator(_backend(args), total_samples=args.total_samples, pre=args.pre,
                                    max_samples=args.max_samples, window=args.window,
                                    lam=0.95 if args.lam is None else args.lam, extract=args.extract,
                                    temperature=args.temperature, max_tokens=args.max_tokens, vote=args.vote,
                                    seed=args.seed)
    allocation = allocator.arun_sync(questions) if args.endpoint else allocator.run(questions)
    _print_results(questions, allocation.results)
    print(json.dumps({"summary": allocation.summary()}), file=sys.stderr)
    return 0


def _print_results(questions: list[Any], results: list[Any]) -> None:
    for q, r in zip(questions, results, strict=True):
        print(json.dumps({"id": r.id, "answer": r.answer, "label": getattr(q, "label", None), "samples": r.n_samples,
                          "tokens": r.n_tokens, "stopped_early": r.stopped_early}))


def cmd_serve(args: argparse.Namespace) -> int:
    from stopwise.sampling.server import check_host, serve

    check_host(args.host)
    serve(model=args.model, host=args.host, port=args.port, max_n=args.max_n, max_tokens=args.max_tokens,
          max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
          shutdown_timeout_s=args.shutdown_timeout, threads=args.threads, system=args.system)
    return 0


def register_cli(subparsers: Any) -> None:
    sample = subparsers.add_parser("sample", help="early-stopped self-consistency sampling (record, calibrate, run)")
    sub = sample.add_subparsers(dest="sample_command", required=True)

    p = sub.add_parser("record", help="record N samples per question into a resumable JSONL checkpoint and a trace")
    _backend_options(p)
    p.add_argument("-n", "--n", type=int, default=16, help="samples per question (default 16)")
    p.add_argument("-o", "--output", required=True, help="JSONL checkpoint (appended; rerun to resume)")
    p.add_argument("--trace", help="trace .npz path (default: the checkpoint with .npz)")
    p.add_argument("--batch-questions", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="record at most this many new questions")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("calibrate", help="certify λ of a sampling rule on a recorded trace")
    p.add_argument("trace")
    p.add_argument("--rule", default="settled", help="settled | asc | dirichlet | dsc | esc | confidence (default settled)")
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--risk", default="gap", help="gap (vs the N-sample vote) | accuracy_drop (needs labels)")
    p.add_argument("-o", "--output", help="write the certificate JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="answer questions with early-stopped sampling")
    _backend_options(p)
    p.add_argument("--rule", default=None,
                   help="esc | asc | dirichlet | dsc | first_finish | confidence | settled (default settled)")
    p.add_argument("--certificate", help="use the certified rule of this certificate")
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--max-samples", type=int, default=16)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--vote", default="majority", help="majority | weighted")
    p.add_argument("--total-samples", type=int, default=None,
                   help="share this many samples across all questions by difficulty (DSC; stops at --lam, "
                        "default 0.95; --step does not apply)")
    p.add_argument("--pre", type=int, default=3, help="with --total-samples: pre-samples per question (default 3)")
    p.add_argument("--window", type=int, default=4,
                   help="with --total-samples: samples per round for the hardest question (default 4)")
    p.set_defaults(func=cmd_run)

    parser, serve_sub = _serve_subcommands(subparsers)
    _chat_options(parser)  # the flat form, `stopwise serve --model ...`, as before subcommands existed
    parser.set_defaults(func=cmd_serve)
    if "chat" not in serve_sub.choices:
        _chat_options(serve_sub.add_parser("chat", help="the OpenAI-compatible chat server (as plain `stopwise serve`)",
                                           description=SERVE_CHAT_DESCRIPTION)).set_defaults(func=cmd_serve)


SERVE_HELP = "serve a model over HTTP on the loopback interface: chat (default) or encoder"
SERVE_DESCRIPTION = ("Serve a local model over HTTP. `stopwise serve [options]` and `stopwise serve chat [options]` "
                     "run the OpenAI-compatible chat server; `stopwise serve encoder --heads DIR` runs the "
                     "early-exit classifier with dynamic batching. Give a subcommand's options after its name.")
SERVE_CHAT_DESCRIPTION = ("OpenAI-compatible chat server for a local model (POST /v1/chat/completions, "
                          "/v1/completions; GET /v1/models, /health) on the loopback interface. Requests over the "
                          "body, prompt-token, n or max_tokens limits are refused with 400/413 before reaching the "
                          "model; a client that disconnects stops its generation.")


def _serve_subcommands(subparsers: Any) -> tuple[argparse.ArgumentParser, Any]:
    """The ``serve`` parser and its subcommands; another adapter (stopwise.serve) adds to the same ones."""
    parser: argparse.ArgumentParser | None = subparsers.choices.get("serve")
    if parser is None:
        parser = subparsers.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION)
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if action is None:
        action = parser.add_subparsers(dest="serve_command", title="subcommands", required=False)
    return parser, action


def _chat_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2", help="bundled model name or local model directory (default smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="loopback interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-n", type=int, default=16, help="largest 'n' (completions per request) accepted (default 16)")
    p.add_argument("--max-tokens", type=int, default=256, help="largest 'max_tokens' accepted (default 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens (default: the model's context length minus --max-tokens)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body in bytes, refused with 413 while streaming (default 1048576)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds SIGTERM waits for generations in flight before stopping them (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--system", default=None, help="system message prepended to every chat conversation")
    return p


def _check_no_torch() -> None:  # used by the tests
    if "torch" in sys.modules:
        raise StopwiseError("torch was imported by stopwise.sampling.cli")
