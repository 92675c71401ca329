#!/usr/bin/env bash
# Install, when missing, the tools some tests drive (a real Kafka client, a real Prometheus, a
# headless browser) and the HTTP load generator `make bench` reads with (wrk). Debian/Ubuntu as
# root only; elsewhere those tests skip with a reason.
set -euo pipefail

declare -A PACKAGE=([kcat]=kcat [prometheus]=prometheus [chromium]=chromium [wrk]=wrk)
missing=()
for tool in "${!PACKAGE[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE[$tool]}")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]} (install them to run every test; the tests needing them skip)" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
