#!/usr/bin/env bash
# The kernel's TCP floor between two network namespaces on this machine, beside which
# `puma-bench --tcp` figures should be read: two plain processes (tcp_floor.c), one per namespace
# and CPU, bounce SIZE bytes over one TCP_NODELAY connection on a veth pair, busy-polling.
# Prints min / median / max one-way µs over the repeats for each size. Root only; the namespaces
# are created here and removed on exit.
# Usage: bash crates/qk/bench-peers/tcp-floor.sh [REPEATS] [SIZES...]   (default: 5 repeats, 1 8)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
reps="${1:-5}"; shift || true
sizes=("${@:-1 8}")
read -r -a sizes <<< "${sizes[*]}"
case "$reps" in ''|*[!0-9]*|0) echo "tcp-floor: REPEATS must be a positive integer, not '$reps'" >&2; exit 2;; esac
for size in "${sizes[@]}"; do
    case "$size" in ''|*[!0-9]*) echo "tcp-floor: a size must be an integer of bytes, not '$size'" >&2; exit 2;; esac
    if [ "$size" -lt 1 ] || [ "$size" -gt 65536 ]; then
        echo "tcp-floor: sizes are 1..65536 bytes (a TCP message carries at least one), not $size" >&2; exit 2
    fi
done
if [ "$(id -u)" != 0 ]; then echo "tcp-floor: needs root (network namespaces)" >&2; exit 1; fi
out="$here/../../../target/bench-peers"; mkdir -p "$out"
cc -O2 -Wall -o "$out/tcp_floor" "$here/tcp_floor.c"
a="tcpfl$$a"; b="tcpfl$$b"
cleanup() { ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$a"; ip netns add "$b"
ip link add "v$$a" netns "$a" type veth peer name "v$$b" netns "$b"
ip -n "$a" addr add 10.235.0.1/24 dev "v$$a"; ip -n "$b" addr add 10.235.0.2/24 dev "v$$b"
for n in "$a" "$b"; do ip -n "$n" link set lo up; done
ip -n "$a" link set "v$$a" up; ip -n "$b" link set "v$$b" up
for size in "${sizes[@]}"; do
    ip netns exec "$a" "$out/tcp_floor" server 10.235.0.1 0 "$size" 20000 "$reps" & srv=$!
    ip netns exec "$b" "$out/tcp_floor" client 10.235.0.1 1 "$size" 20000 "$reps" \
        | sort -k3,3n | awk -v s="$size" '{v[NR]=$3} END {
            if (NR == 0) exit 1;
            printf "TCP floor %d B one-way (µs): min %.2f median %.2f max %.2f (%d repeats)\n",
                   s, v[1], v[int((NR+1)/2)], v[NR], NR }'
    wait "$srv"
done
