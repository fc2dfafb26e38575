"""The ``ppo`` stage on several processes: ``python -m calibrated_rlhf.runtime.launch --pipelines ppo``, kept by
its old name.

    accelerate launch --num_processes 4 -m calibrated_rlhf.runtime.ppo_launch [--env ENV] [--params k=v,...] \\
        [--load-versions ds:ver,...]

See ``calibrated_rlhf.runtime.launch``: every rank runs a real ``kedro run`` of the stage, so all project hooks apply.
"""

from __future__ import annotations

import sys

from calibrated_rlhf.runtime import launch


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    launch.cli.main(args=["--pipelines", "ppo", *args], prog_name="python -m calibrated_rlhf.runtime.ppo_launch")


if __name__ == "__main__":
    main()
