"""How long validate_key takes for a key flooded with third-party certifications, and what is
stored. The target: well under a second for 1,500-5,000 certifications, because the flood is
cut out at the packet level before gpg reads the key.

    .venv/bin/python bench/flooded_key.py [--counts 1500 5000] [--runs 5]

Prints, per flood size: the upload size, the median (and min/max) time of validate_key, the
time of the packet-level strip alone, and the stored key's size. Then the same for forged
"self-signatures" (copies of the user ID's, re-dated, which gpg would have to verify one by
one): up to the per-component cap they are trimmed, past it refused before gpg runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keystore.sanitize import strip_key
from keystore.validate import KeyRejected, decode_keyblock, validate_key
from tests.support.forgery import forged_self_signatures, forged_user_ids
from tests.support.openpgp_tools import KeyFactory


def measure(flooded: bytes, runs: int) -> tuple[list[float], float, int]:
    """validate_key times over ``runs``, median strip time, stored size."""
    times: list[float] = []
    stored = 0
    for _ in range(runs):
        started = time.perf_counter()
        validated = validate_key(flooded)
        times.append(time.perf_counter() - started)
        stored = len(validated.key.key_data)
    binary = decode_keyblock(flooded)
    strips: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        strip_key(binary)
        strips.append(time.perf_counter() - started)
    return times, statistics.median(strips), stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1500, 5000])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bfk-", dir="/tmp") as root,
        KeyFactory(Path(root)) as factory,
    ):
        key = factory.make("flooded@example.test")
        print(f"plain key: {len(key.public)} bytes armored")
        for count in args.counts:
            flooded = factory.flooded(key, count=count)
            times, strip, stored = measure(flooded, args.runs)
            print(
                f"{count:>6} certifications: upload {len(flooded) / 1024:7.1f} KiB armored;"
                f" validate_key median {statistics.median(times) * 1000:6.1f} ms"
                f" (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, {args.runs} runs);"
                f" packet strip alone {strip * 1000:5.1f} ms; stored {stored} bytes"
            )
        binary = decode_keyblock(key.public)
        for label, forged in (
            ("forged self-signatures: 90", forged_self_signatures(binary, 90, newer=False)),
            ("forged self-signatures: 7000", forged_self_signatures(binary, 7000)),
            ("63 user IDs x 100 forged", forged_user_ids(binary, 63, 100)),
        ):
            started = time.perf_counter()
            try:
                validate_key(forged)
                verdict = "accepted (the genuine self-signature is the newest)"
            except KeyRejected as error:
                verdict = f"refused: {str(error)[:60]}"
            took = (time.perf_counter() - started) * 1000
            print(f"{label:>30}: {len(forged) / 1024:7.1f} KiB; {took:7.1f} ms; {verdict}")


if __name__ == "__main__":
    main()
