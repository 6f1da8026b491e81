#!/usr/bin/env bash
# System packages dlforge needs on a fresh Debian machine: the Fashion-MNIST source data set the
# proposer trains a repository candidate on, and the Chromium the console's browser tests drive
# (through Playwright, with the system browser: nothing is downloaded at test time). Installed
# once; skipped when already present.
set -euo pipefail
need=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
dpkg -s chromium >/dev/null 2>&1 || need+=(chromium)
dpkg -s chromium-driver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install as root: apt-get install ${need[*]}" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
