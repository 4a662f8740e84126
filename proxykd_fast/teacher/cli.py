"""The `collect` and `serve-teacher` subcommands: config dataclasses parsed like every stage (flags or `--config`).

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
from dataclasses import dataclass
from pathlib import Path

from proxykd_fast.argparsing import Command, build_command_parser, run_command
from proxykd_fast.options import option

from .collect import CollectConfig
from .faults import FAULT_KINDS

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


@dataclass
class CollectArgs(CollectConfig):
    """`proxykd collect`'s options: the collection's (CollectConfig), plus where to write the summary."""

    summary_json: Path | None = option(None, help="also write the summary as JSON here")


def run_collect(config: CollectConfig) -> int:
    """Run a collection and print the summary; returns the exit code (module docstring)."""
    from .collect import CollectError, collect

    _setup_logging()
    try:
        summary = collect(config)
    except (CollectError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    print(summary.format())
    summary_json = getattr(config, "summary_json", None)
    if summary_json is not None:
        Path(summary_json).write_text(json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8")
    return EXIT_OK if summary.remaining == 0 else EXIT_FAILURES


@dataclass
class ServeConfig:
    """`proxykd serve-teacher`'s options: an OpenAI-compatible server over a local model."""

    model: str = option(help="preset (smollm2, tiny), local HF model dir or .gguf file (required)")
    served_model_name: str | None = option(None, help="name clients must use (unset: --model)")
    host: str = option("127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    port: int = option(8000, help="TCP port")
    system_prompt_file: Path | None = option(None, help=(
        "file holding the hidden system prompt prepended to every chat (preferred: keep it chmod 600; one trailing "
        f"newline is dropped). ${SYSTEM_PROMPT_ENV} is the next best place"))
    system_prompt: str | None = option(None, help=(
        "the hidden system prompt itself; avoid for a secret prompt: a command line shows in `ps` and shell history "
        f"to every user of the machine (use --system-prompt-file or ${SYSTEM_PROMPT_ENV}, readable only by you and "
        "root); give the prompt one way only"))
    hidden_prompt_reserve: int | None = option(None, help=(
        "tokens of the context set aside for the hidden prompt; clients see context minus this (unset: its length "
        "plus a margin, rounded up to 256, so only a coarse bound shows)"))
    idempotency_cache: int = option(4096, help="answers kept for repeated Idempotency-Key requests (0: ignore the "
                                               "header)")
    max_batch_size: int = option(8, help="most requests generated together")
    batch_wait_ms: float = option(5.0, help="how long to wait to fill a batch")
    default_max_tokens: int = option(256, help="chat max_tokens when a request gives none")
    num_threads: int | None = option(None, help="torch CPU threads (unset: torch's choice)")
    api_key_env: str | None = option(None, help="require the key held in this environment variable")
    fault_rate: float = option(0.0, help="total rate of injected faults (testing)")
    fault_kinds: str = option(",".join(FAULT_KINDS), help=f"comma list of fault kinds ({','.join(FAULT_KINDS)})")
    fault_seed: int = option(0, help="seed of the fault schedule")
    fault_retry_after: float = option(1.0, help="Retry-After seconds sent with 429")
    fault_slow_seconds: float = option(30.0, help="stall of a 'slow' fault")
    latency: float = option(0.0, help="extra seconds on every completion request")
    log_level: str = option("info", help="uvicorn log level")


def run_serve(config: ServeConfig) -> int:
    """Load the model and serve until interrupted; returns the exit code."""
    from .faults import FaultConfig
    from .presets import PresetError, load_teacher
    from .server import TeacherServer

    _setup_logging()
    kinds = [k.strip() for k in config.fault_kinds.split(",") if k.strip()]
    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            print(f"error: ${config.api_key_env} is not set", file=sys.stderr)
            return EXIT_ERROR
    try:
        system_prompt = resolve_system_prompt(config.system_prompt, config.system_prompt_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        faults = FaultConfig.uniform(
            config.fault_rate,
            kinds,
            seed=config.fault_seed,
            retry_after=config.fault_retry_after,
            slow_seconds=config.fault_slow_seconds,
            latency=config.latency,
        )
        model, tokenizer = load_teacher(config.model)
    except (ValueError, PresetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        server = TeacherServer(
            model,
            tokenizer,
            model_name=config.served_model_name or config.model,
            host=config.host,
            port=config.port,
            system_prompt=system_prompt,
            max_batch_size=config.max_batch_size,
            batch_wait_ms=config.batch_wait_ms,
            default_max_tokens=config.default_max_tokens,
            faults=faults if faults.active else None,
            log_level=config.log_level,
            num_threads=config.num_threads,
            api_key=api_key,
            hidden_prompt_reserve=config.hidden_prompt_reserve,
            idempotency_cache=config.idempotency_cache,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


COMMANDS = {
    "collect": Command(CollectArgs, run_collect, help="collect teacher completions from an OpenAI-compatible API",
                       description="Collect teacher completions for a prompts JSONL; safe to re-run after any "
                                   "interruption.", epilog=COLLECT_GUARANTEES),
    "serve-teacher": Command(ServeConfig, run_serve, help="serve a local model behind an OpenAI-compatible API",
                             description="Serve /v1/chat/completions, /v1/completions and /v1/models over a local "
                                         "causal LM."),
}


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
    return build_command_parser("python -m proxykd_fast.teacher", "Collect or serve teacher answers", COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m proxykd_fast.teacher`."""
    return run_command(build_parser(), COMMANDS, sys.argv[1:] if argv is None else argv)
