#!/usr/bin/env bash
# `make test` on a loaded machine: one busy loop per core (at least two), at normal priority,
# for as long as the suite runs. A test that passes only on a quiet machine depends on timing,
# which is a bug: a newcomer's laptop or a shared CI runner is busier than ours.
#   scripts/stress-test.sh                 # make test under load
#   scripts/stress-test.sh make pytest     # any command under load
set -uo pipefail
cd "$(dirname "$0")/.."
hogs=$(nproc 2>/dev/null || echo 2)
[ "$hogs" -lt 2 ] && hogs=2
pids=()
stop_hogs() { [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; }
trap stop_hogs EXIT INT TERM
for _ in $(seq "$hogs"); do
  ( while :; do :; done ) &
  pids+=($!)
done
echo "stress-test: $hogs busy loops (pids ${pids[*]}); $(uptime)" >&2
started=$(date +%s)
if [ $# -gt 0 ]; then "$@"; else make test; fi
status=$?
echo "stress-test: exit $status after $(( $(date +%s) - started )) s; $(uptime)" >&2
exit $status
