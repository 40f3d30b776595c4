#!/usr/bin/env bash
# Installs the Debian 12 packages luahub needs to build, run and test.
# Idempotent: does nothing (no apt call at all) when every package is present.
set -euo pipefail

pkgs=(
  build-essential cmake pkg-config
  libuv1-dev
  libwebsockets-dev libwebsockets-evlib-uv
  libhiredis-dev
  liblua5.4-dev lua-cjson-dev
  libyajl-dev
  libssl-dev openssl
  check
  redis-server
  iproute2 util-linux
  chromium
  # the fuzz targets (tests/fuzz): clang and its libFuzzer runtime, which
  # clang only recommends (and recommends are not installed here)
  clang libclang-rt-dev
)
# node and npm for the JavaScript suites (tests/js): Debian's nodejs and npm
# when there is no node at all; an installed node (e.g. 20 from elsewhere,
# whose package provides npm) is left alone.
command -v node >/dev/null || pkgs+=(nodejs)
command -v npm >/dev/null || pkgs+=(npm)

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
