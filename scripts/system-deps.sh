#!/usr/bin/env bash
# The system programs the test suite runs for real: Redis (the queue), Chromium and its driver
# (the status page), docker-compose (validates the compose file), Node.js (the HTTP example).
# `make test` calls this.
# As root it installs what is missing with apt-get; otherwise it names the one command to run.
set -euo pipefail
declare -A provides=([redis-server]=redis-server [chromium]=chromium [chromedriver]=chromium-driver
                     [docker-compose]=docker-compose [node]=nodejs)
need=()
for program in redis-server chromium chromedriver docker-compose node; do
  command -v "$program" >/dev/null 2>&1 || need+=("${provides[$program]}")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "The tests need these system packages: ${need[*]}" >&2
  echo "Install them once with:  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "The tests need: ${need[*]} (no apt-get here: install them with your package manager)" >&2
  exit 1
fi
echo "installing system packages for the tests: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
