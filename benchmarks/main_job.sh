#!/usr/bin/env bash
# The README's main job, 10 fresh runs: a new folder each time, the command as a user types it.
cd "$1"
for i in $(seq 1 10); do
  rm -rf runs/patch
  s=$(date +%s.%N)
  .venv/bin/olmo-iv patch > /tmp/mainjob_$i.out 2>&1
  rc=$?
  e=$(date +%s.%N)
  printf "run %2d: %.2f s (rc=%d, load %s)\n" $i $(echo "$e - $s" | bc) $rc "$(cut -d' ' -f1 /proc/loadavg)"
done
