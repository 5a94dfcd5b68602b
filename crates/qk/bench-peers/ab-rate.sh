#!/bin/bash
# Paired single-round runs of our fabric only (0 B latency + 8 B message rate), cycling over the
# given puma-bench binaries N times under the shared benchmark lock, so that every binary of a
# cycle meets the same machine state (the VM's two CPUs flip between "near" and "far").
# Prints one line per cycle: "lat0 rate" for each binary, in order.
#   usage: crates/qk/bench-peers/ab-rate.sh N BIN_A BIN_B [BIN_C ...]   (from the workspace root)
# A cycle whose 0 B latencies are all below 0.3 µs is "near", all above "far".
set -eu
n=$1
shift
one() {
    chrt -f 10 "$1" --peers /nonexistent --reps 1 --scale 0.3 --only lat,rate --modes heater \
        --sizes 0,8 2>/dev/null |
        awk '/latency 0 B/{s="l"} /latency 8 B/{s="x"} /rate 8 B/{s="r"} /^  qk heater/{v[s]=$6}
             END{printf "%s %s ", v["l"], v["r"]}'
}
export -f one
flock /tmp/bench.lock bash -c '
    n=$1; shift
    for _ in $(seq "$n"); do
        for b in "$@"; do one "$b"; done
        echo
    done' _ "$n" "$@"
