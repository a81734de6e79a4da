#!/usr/bin/env bash
# Installs what ringpark builds and tests with, from Debian 12's packages.
# Idempotent: does nothing when everything is already there.
set -euo pipefail
pkgs=(build-essential cmake pkg-config liburing-dev libuv1-dev libgtest-dev libgmock-dev
      libseccomp-dev dpkg-dev iproute2 util-linux curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
