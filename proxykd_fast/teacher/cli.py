"""argparse subcommands `collect` and `serve-teacher`, to be registered on the main proxykd CLI.

Exit codes of `collect`: 0 every unit has a record, 1 the run finished but some units failed
(re-run to retry them), 2 the run could not start or was stopped (bad input, auth, model, server),
130 interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURES, EXIT_ERROR = 0, 1, 2
SYSTEM_PROMPT_ENV = "PROXYKD_SYSTEM_PROMPT"

COLLECT_GUARANTEES = """\
what a re-run guarantees (after Ctrl-C, a crash or kill -9):
  - every unit (prompt x sample) ends up in records.jsonl exactly once, and none is lost; a
    line cut by a kill is repaired; a unit already on disk is never requested again.
  - billing: a request in flight when the collector dies may already have been billed, and the
    re-run sends it again. inflight.jsonl records every request before it leaves, so the re-run
    repeats it with the same Idempotency-Key: a server that honours the header (serve-teacher
    does) answers from its cache and bills nothing twice. A server that ignores it bills again
    up to --concurrency requests per interruption (the ones in flight). Likewise a request that
    timed out may have been billed, and its retry is billed again unless the key is honoured.
"""


def add_collect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `collect`: gather teacher completions for a prompts JSONL into a resumable dataset."""
    p = subparsers.add_parser(
        "collect",
        help="collect teacher completions from an OpenAI-compatible API",
        description="Collect teacher completions for a prompts JSONL; safe to re-run after any interruption.",
        epilog=COLLECT_GUARANTEES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompts", required=True, type=Path, help="JSONL with {'prompt': ...} or {'messages': [...]}")
    p.add_argument("--out", required=True, type=Path, help="output directory (records.jsonl, failures.jsonl)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="teacher model name")
    p.add_argument("--n-per-prompt", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="base seed; sample k uses seed + k")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt (default 60)")
    p.add_argument("--max-retries", type=int, default=6, help="retries per request (default 6)")
    p.add_argument("--backoff-base", type=float, default=0.5, help="first backoff in seconds (doubles each retry)")
    p.add_argument("--backoff-max", type=float, default=30.0, help="longest backoff in seconds")
    p.add_argument("--max-retry-after", type=float, default=60.0, help="cap on a server's Retry-After")
    p.add_argument("--mode", choices=["chat", "completions"], default="chat")
    p.add_argument("--on-bad-line", choices=["skip", "error"], default="error", help="malformed prompt lines")
    p.add_argument("--price-input-per-1k", type=float, default=0.0, help="price per 1k prompt tokens")
    p.add_argument("--price-output-per-1k", type=float, default=0.0, help="price per 1k completion tokens")
    p.add_argument("--format", choices=["prompt_completion", "messages"], default="prompt_completion")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-model-check", action="store_true", help="skip the /models check before starting")
    p.add_argument("--allow-config-change", action="store_true", help="resume even if sampling settings changed")
    p.add_argument("--max-consecutive-failures", type=int, default=50, help="stop after this many in a row (0: never)")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the summary as JSON here")
    p.add_argument(
        "--no-idempotency-key",
        action="store_true",
        help="do not send the Idempotency-Key header (for a server or proxy that rejects it); "
        "an interrupted run may then be billed again for up to --concurrency requests",
    )
    p.set_defaults(func=run_collect)
    return p


def run_collect(args: argparse.Namespace) -> int:
    """Handler for `collect`: run the collection and print the summary; returns the exit code."""
    from .collect import CollectConfig, CollectError, collect

    _setup_logging()
    config = CollectConfig(
        prompts=args.prompts,
        out=args.out,
        base_url=args.base_url,
        model=args.model,
        n_per_prompt=args.n_per_prompt,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        max_retries=args.max_retries,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        max_retry_after=args.max_retry_after,
        mode=args.mode,
        on_bad_line=args.on_bad_line,
        price_input_per_1k=args.price_input_per_1k,
        price_output_per_1k=args.price_output_per_1k,
        format=args.format,
        progress=not args.no_progress,
        check_model=not args.no_model_check,
        allow_config_change=args.allow_config_change,
        max_consecutive_failures=args.max_consecutive_failures,
        idempotency_key=not args.no_idempotency_key,
    )
    try:
        summary = collect(config)
    except (CollectError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    print(summary.format())
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8")
    return EXIT_OK if summary.remaining == 0 else EXIT_FAILURES


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve-teacher`: an OpenAI-compatible server over a local Hugging Face model."""
    from .faults import FAULT_KINDS

    p = subparsers.add_parser(
        "serve-teacher",
        help="serve a local model behind an OpenAI-compatible API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models over a local causal LM.",
    )
    p.add_argument("--model", required=True, help="preset (smollm2, tiny), local HF model dir or .gguf file")
    p.add_argument("--served-model-name", default=None, help="name clients must use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    hidden = p.add_mutually_exclusive_group()
    hidden.add_argument(
        "--system-prompt-file",
        type=Path,
        default=None,
        help="file holding the hidden system prompt prepended to every chat (preferred: keep it chmod 600; "
        f"one trailing newline is dropped). ${SYSTEM_PROMPT_ENV} is the next best place",
    )
    hidden.add_argument(
        "--system-prompt",
        default=None,
        help="the hidden system prompt itself; avoid for a secret prompt: a command line shows in `ps` "
        f"and shell history to every user of the machine (use --system-prompt-file or ${SYSTEM_PROMPT_ENV}, "
        "readable only by you and root)",
    )
    p.add_argument(
        "--hidden-prompt-reserve",
        type=int,
        default=None,
        help="tokens of the context set aside for the hidden prompt; clients see context minus this "
        "(default: its length plus a margin, rounded up to 256, so only a coarse bound shows)",
    )
    p.add_argument(
        "--idempotency-cache",
        type=int,
        default=4096,
        help="answers kept for repeated Idempotency-Key requests (default 4096; 0: ignore the header)",
    )
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to wait to fill a batch")
    p.add_argument("--default-max-tokens", type=int, default=256, help="chat max_tokens when not given")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--api-key-env", default=None, help="require the key held in this environment variable")
    p.add_argument("--fault-rate", type=float, default=0.0, help="total rate of injected faults (testing)")
    p.add_argument(
        "--fault-kinds", default=",".join(FAULT_KINDS), help=f"comma list of fault kinds ({','.join(FAULT_KINDS)})"
    )
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--fault-retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429")
    p.add_argument("--fault-slow-seconds", type=float, default=30.0,
                   help="longest stall of a 'slow' fault (it ends sooner when the client gives up)")
    p.add_argument("--latency", type=float, default=0.0, help="extra seconds on every completion request")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Handler for `serve-teacher`: load the model and serve until interrupted."""
    from .faults import FaultConfig
    from .presets import PresetError, load_teacher
    from .server import TeacherServer

    _setup_logging()
    kinds = [k.strip() for k in args.fault_kinds.split(",") if k.strip()]
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: ${args.api_key_env} is not set", file=sys.stderr)
            return EXIT_ERROR
    try:
        system_prompt = resolve_system_prompt(args.system_prompt, args.system_prompt_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        faults = FaultConfig.uniform(
            args.fault_rate,
            kinds,
            seed=args.fault_seed,
            retry_after=args.fault_retry_after,
            slow_seconds=args.fault_slow_seconds,
            latency=args.latency,
        )
        model, tokenizer = load_teacher(args.model)
    except (ValueError, PresetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        server = TeacherServer(
            model,
            tokenizer,
            model_name=args.served_model_name or args.model,
            host=args.host,
            port=args.port,
            system_prompt=system_prompt,
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            default_max_tokens=args.default_max_tokens,
            faults=faults if faults.active else None,
            log_level=args.log_level,
            num_threads=args.num_threads,
            api_key=api_key,
            hidden_prompt_reserve=args.hidden_prompt_reserve,
            idempotency_cache=args.idempotency_cache,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def resolve_system_prompt(flag: str | None, path: Path | None, environ: dict[str, str] | None = None) -> str | None:
    """The hidden system prompt from exactly one of --system-prompt, --system-prompt-file, $PROXYKD_SYSTEM_PROMPT.

    ValueError when it is given twice (no source silently wins) or the file is missing or empty.
    """
    env = (os.environ if environ is None else environ).get(SYSTEM_PROMPT_ENV)
    given = [name for name, v in (("--system-prompt", flag), ("--system-prompt-file", path)) if v is not None]
    if env is not None:
        given.append(f"${SYSTEM_PROMPT_ENV}")
    if len(given) > 1:
        raise ValueError(f"the hidden system prompt is given {len(given)} times ({', '.join(given)}); give it once")
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --system-prompt-file {path}: {exc}") from None
        text = text.removesuffix("\n").removesuffix("\r")
        if not text.strip():
            raise ValueError(f"--system-prompt-file {path} is empty")
        return text
    if flag is not None:
        logging.getLogger(__name__).warning(
            "--system-prompt is visible to every user of this machine in `ps`; prefer --system-prompt-file "
            "or $%s",
            SYSTEM_PROMPT_ENV,
        )
        return flag
    if env is not None and not env.strip():
        raise ValueError(f"${SYSTEM_PROMPT_ENV} is set but empty")
    return env


def _setup_logging() -> None:
    """Show warnings (bad lines, repairs) on stderr unless logging is configured already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    """A parser with just the teacher subcommands (for `python -m proxykd_fast.teacher`)."""
    parser = argparse.ArgumentParser(prog="python -m proxykd_fast.teacher")
    sub = parser.add_subparsers(dest="command", required=True)
    add_collect_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m proxykd_fast.teacher`."""
    args = build_parser().parse_args(argv)
    return args.func(args)
