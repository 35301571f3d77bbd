"""``python slow_prepare.py SECONDS PREPARE-ARGS...``: `selfflow prepare` with every encoder
batch slowed down by SECONDS, so that a test can kill it half way through."""

from __future__ import annotations

import sys
import time

from selfflow import cli
from selfflow.model import vae

if __name__ == "__main__":
    delay, args = float(sys.argv[1]), sys.argv[2:]
    encode = vae.encode_posterior

    def slow_encode(model, images):
        time.sleep(delay)
        return encode(model, images)

    vae.encode_posterior = slow_encode
    raise SystemExit(cli.main(["prepare", *args]))
