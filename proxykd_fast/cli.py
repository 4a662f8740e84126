"""The `proxykd` console script: teacher collection/serving and the Proxy-KD pipeline stages."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .pipeline.config import AlignProxyConfig, DistillConfig, EvalConfig, PrecomputeConfig, StageConfig


def _stage(sub: Any, name: str, cls: type[StageConfig], run: Callable[[Any], Any], helptext: str) -> None:
    """Register one pipeline stage whose flags mirror its config dataclass."""
    p = sub.add_parser(name, help=helptext, description=helptext)
    cls.add_arguments(p)
    if cls is DistillConfig:
        p.add_argument("--no-weights", dest="use_weights", action="store_false",
                       help="ablation: drop the per-sample weights w (same as --no-use-weights)")

    def handler(args: argparse.Namespace) -> int:
        result = run(cls.from_args(args))
        print(json.dumps(result, indent=2, default=str))
        return 0 if not isinstance(result, dict) or result.get("finished", True) else 3

    p.set_defaults(func=handler)


def _align(cfg: AlignProxyConfig) -> Any:
    from .pipeline.align import align_proxy

    return align_proxy(cfg)


def _precompute(cfg: PrecomputeConfig) -> Any:
    from .pipeline.precompute import precompute

    return precompute(cfg)


def _prior(cfg: Any) -> Any:
    from .prior.build import build_prior

    return build_prior(cfg)


def _distill(cfg: DistillConfig) -> Any:
    from .pipeline.distill import distill

    return distill(cfg)


def _eval(cfg: EvalConfig) -> Any:
    from .pipeline.evaluate import evaluate

    return evaluate(cfg)


def build_parser() -> argparse.ArgumentParser:
    """The full `proxykd` parser."""
    parser = argparse.ArgumentParser(prog="proxykd", description="Distill black-box LLMs through a white-box proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    try:
        from .teacher.cli import add_collect_parser, add_serve_parser

        add_collect_parser(sub)
        add_serve_parser(sub)
    except ImportError:  # pragma: no cover - the teacher package is optional here
        pass
    _stage(sub, "align-proxy", AlignProxyConfig, _align, "SFT warm-up + NLL/DPO rounds to align the proxy")
    from .prior.build import PriorConfig

    _stage(sub, "prior", PriorConfig, _prior, "count the teacher's tokens into a back-off n-gram prior "
           "(precompute --prior)")
    _stage(sub, "precompute", PrecomputeConfig, _precompute, "store the proxy's top-k targets and sample weights")
    _stage(sub, "distill", DistillConfig, _distill, "train the student: NLL + alpha * w * KL(proxy || student)")
    _stage(sub, "eval", EvalConfig, _eval, "held-out NLL, KL to a reference model, generation samples")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `proxykd` console script."""
    from .pipeline.modeling import PipelineError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (PipelineError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
