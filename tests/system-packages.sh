#!/usr/bin/env bash
# The system packages some tests need, installed by `make test` where it can: Slurm + munge
# for the real local cluster of tests/test_slurm.py, slurmdbd + MariaDB for the site-shaped
# one of tests/test_slurm_site.py (42 s, 193 MB), Chromium + its driver for the report's
# browser test. Idempotent: when every package is installed it exits at once, touching
# nothing. Installs only as root on a machine with apt-get (Debian/Ubuntu); elsewhere it
# prints one line naming what is missing and exits 0, and those tests skip with the reason,
# unless SCPRINT_REQUIRE_SYSTEM_PACKAGES=1 (CI, .ci/run): then it fails.
set -euo pipefail

PACKAGES=${SCPRINT_SYSTEM_PACKAGES:-"slurmctld slurmd slurm-client munge slurmdbd mariadb-server chromium chromium-driver"}

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
if command -v dpkg-query >/dev/null; then
    for package in $PACKAGES; do
        installed "$package" || missing+=("$package")
    done
else
    read -r -a missing <<<"$PACKAGES"
fi
[ ${#missing[@]} -eq 0 ] && exit 0

skip() {  # $1: why they cannot be installed here
    echo "system packages missing (${missing[*]}), $1: the tests that need them skip;" \
        "install them with: sudo apt-get install -y ${missing[*]}" >&2
    [ "${SCPRINT_REQUIRE_SYSTEM_PACKAGES:-0}" = 1 ] && exit 1
    exit 0
}

why=""
if ! command -v apt-get >/dev/null; then
    why="no apt-get (not Debian/Ubuntu)"
elif [ "$(id -u)" -ne 0 ]; then
    why="not root"
fi
[ -n "$why" ] && skip "$why"

echo "installing system packages for the tests: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || skip "apt-get update failed"
apt-get install -y -qq "${missing[@]}" >/dev/null || skip "apt-get install failed"
