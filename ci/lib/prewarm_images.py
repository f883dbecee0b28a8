"""Build every image the test bed uses, on the test bed's own docker engine and data root.

Run by ci/setup beside the Go builds on a cold cache: the Debian base (debootstrap) and the
image builds wait mostly on downloads, so they overlap well with compiling. The tests still
build each image themselves; by then BuildKit answers from its cache.

Usage: python ci/lib/prewarm_images.py
"""

from __future__ import annotations

import signal
import sys

from jobtide_testbed.chartnode import build_chart_images
from jobtide_testbed.images import DockerDaemon, ImageBuilder


def main() -> int:
    # ci/setup stops its lanes with SIGTERM when another lane fails: unwind, so the private
    # dockerd is stopped rather than left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with DockerDaemon() as daemon:
        for tag in build_chart_images(ImageBuilder(daemon)):
            print(f"setup: image {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
