"""The `proxykd` console script: teacher collection/serving and the Proxy-KD pipeline stages.

Every subcommand is parsed the same way (`proxykd_fast.argparsing.ConfigParser`, TRL's parser over
the command's config dataclass): flags, `--config file.yaml`, aliases and "did you mean".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .argparsing import Command, build_command_parser, run_command, subcommand_parser
from .pipeline.config import AlignProxyConfig, DistillConfig, EvalConfig, PrecomputeConfig

EXIT_UNFINISHED = 3


def _stage(run: Callable[[Any], Any]) -> Callable[[Any], int]:
    """A stage's command: run it, print its result as JSON; exit code 3 when it stopped unfinished."""

    def command(cfg: Any) -> int:
        result = run(cfg)
        print(json.dumps(result, indent=2, default=str))
        return 0 if not isinstance(result, dict) or result.get("finished", True) else EXIT_UNFINISHED

    return command


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
    "align-proxy": Command(AlignProxyConfig, _stage(_align), "SFT warm-up + NLL/DPO rounds to align the proxy"),
    "precompute": Command(PrecomputeConfig, _stage(_precompute), "store the proxy's top-k targets and sample weights"),
    "distill": Command(DistillConfig, _stage(_distill), "train the student: NLL + alpha * w * KL(proxy || student)"),
    "eval": Command(EvalConfig, _stage(_eval), "held-out NLL, KL to a reference model, generation samples"),
}


def commands() -> dict[str, Command]:
    """Every `proxykd` subcommand: the teacher's (collect, serve-teacher), then the pipeline stages."""
    from .teacher.cli import COMMANDS as TEACHER

    return {**TEACHER, **STAGES}


def build_parser() -> argparse.ArgumentParser:
    """The full `proxykd` parser: one ConfigParser per subcommand."""
    return build_command_parser("proxykd", "Distill black-box LLMs through a white-box proxy", commands())


def parse_command(argv: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[str, Any]:
    """(subcommand, its config) for a command line, e.g. ["distill", "--config", "d.yaml"]."""
    cmds = commands()
    if not argv or argv[0] not in cmds:
        raise ValueError(f"expected a subcommand ({', '.join(cmds)}), got {argv[:1]}")
    return argv[0], subcommand_parser(parser or build_parser(), argv[0]).parse(argv[1:])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `proxykd` console script."""
    from .pipeline.modeling import PipelineError

    return run_command(build_parser(), commands(), sys.argv[1:] if argv is None else argv,
                       errors=(PipelineError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
