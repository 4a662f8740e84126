"""The `proxykd` console script: teacher collection/serving and the Proxy-KD pipeline stages.

Every pipeline stage is parsed the same way (`proxykd_fast.argparsing.ConfigParser`, TRL's parser
over the stage's config dataclass): flags, `--config file.yaml`, aliases and "did you mean".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .argparsing import ConfigParser
from .pipeline.config import AlignProxyConfig, DistillConfig, EvalConfig, PrecomputeConfig

EXIT_UNFINISHED = 3


@dataclass(frozen=True)
class Stage:
    """A pipeline subcommand: its config class, the function it runs, its one-line help."""

    config: type
    run: Callable[[Any], Any]
    help: str


def _align(cfg: AlignProxyConfig) -> Any:
    from .pipeline.align import align_proxy

    return align_proxy(cfg)


def _precompute(cfg: PrecomputeConfig) -> Any:
    from .pipeline.precompute import precompute

    return precompute(cfg)


def _distill(cfg: DistillConfig) -> Any:
    from .pipeline.distill import distill

    return distill(cfg)


def _eval(cfg: EvalConfig) -> Any:
    from .pipeline.evaluate import evaluate

    return evaluate(cfg)


STAGES = {
    "align-proxy": Stage(AlignProxyConfig, _align, "SFT warm-up + NLL/DPO rounds to align the proxy"),
    "precompute": Stage(PrecomputeConfig, _precompute, "store the proxy's top-k targets and sample weights"),
    "distill": Stage(DistillConfig, _distill, "train the student: NLL + alpha * w * KL(proxy || student)"),
    "eval": Stage(EvalConfig, _eval, "held-out NLL, KL to a reference model, generation samples"),
}


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    """The subcommand action of the `proxykd` parser."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def build_parser() -> argparse.ArgumentParser:
    """The full `proxykd` parser: one ConfigParser per subcommand."""
    parser = argparse.ArgumentParser(prog="proxykd", description="Distill black-box LLMs through a white-box proxy")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ConfigParser)
    try:
        from .teacher.cli import add_collect_parser, add_serve_parser

        add_collect_parser(sub)
        add_serve_parser(sub)
    except ImportError:  # pragma: no cover - the teacher package is optional here
        pass
    for name, stage in STAGES.items():
        sub.add_parser(name, config_class=stage.config, help=stage.help, description=stage.help)
    return parser


def parse_command(argv: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[str, Any]:
    """(subcommand, its config) for a pipeline stage's command line, e.g. ["distill", "--config", "d.yaml"]."""
    parser = parser or build_parser()
    if not argv or argv[0] not in STAGES:
        raise ValueError(f"expected a pipeline stage ({', '.join(STAGES)}), got {argv[:1]}")
    return argv[0], _subparsers(parser).choices[argv[0]].parse(argv[1:])


def _run_stage(name: str, cfg: Any) -> int:
    """Run one stage, print its result as JSON; exit code 3 when it stopped unfinished."""
    result = STAGES[name].run(cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0 if not isinstance(result, dict) or result.get("finished", True) else EXIT_UNFINISHED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `proxykd` console script."""
    from .pipeline.modeling import PipelineError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in STAGES:
            return _run_stage(*parse_command(argv, parser))
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except (PipelineError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
