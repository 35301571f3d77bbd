"""One process of a hand-made two-process run: ``python two_ranks.py MODE SAMPLE-ARGS...``.

The environment gives RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, as torchrun
would, but no torchrun agent watches the processes: when one dies, nothing stops the other,
which must notice by itself. MODE ``die``: rank 1 exits abruptly at its first network call.
MODE ``plain``: no change (the shared-folder check waits 1 s instead of 10).
"""

from __future__ import annotations

import functools
import os
import sys

from selfflow.base import distributed
from selfflow.batch import cli, runner


def die_on_rank_one(pipe) -> None:
    if os.environ["RANK"] != "1":
        return

    def dead(x, tau, y):
        os._exit(3)  # no clean-up, no message: as a SIGKILL or a segfault would leave it

    pipe.model_fn = dead


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    distributed.SHARED_CHECK_WAIT = 1.0
    if mode == "die":
        runner.generate_fid_batch = functools.partial(
            runner.generate_fid_batch, prepare_pipeline=die_on_rank_one
        )
    raise SystemExit(cli.main(args))
