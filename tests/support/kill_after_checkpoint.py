"""Run the `proxykd` CLI and SIGKILL it right after checkpoint STEP is complete: a kill at a known point.

    python -m tests.support.kill_after_checkpoint STEP distill --student ... --output-dir ...

Polling the output directory and killing "soon after" a checkpoint appears races the run (under
load it can finish first); killing from inside the process, after the checkpoint's save returned,
lands at the same step every time.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    """Patch the trainer's checkpoint save to kill the process after step argv[0], then run the CLI."""
    from proxykd_fast import cli
    from proxykd_fast.pipeline import trainer

    kill_at = int(argv[0])
    save = trainer.save_checkpoint

    def save_then_kill(root, step, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        path = save(root, step, *args, **kwargs)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    trainer.save_checkpoint = save_then_kill
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
