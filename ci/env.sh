# shellcheck shell=bash
# Sourced by ci/test, ci/testbed, ci/images and ci/demo: where the test bed's tools live.
export JOBTIDE_CACHE=${JOBTIDE_CACHE:-$HOME/.cache/jobtide}
export PATH="$JOBTIDE_CACHE/bin/current:$PATH"
