#!/usr/bin/env bash
# CPU time an idle two-node job costs: two miniature PCTs (`qk-test-rank node`), one per network
# namespace and CPU, each with its node engine on its rank's CPU; node 0's rank waits three times
# for a signal node 1's rank sends 1 s later. Prints each node process's user/sys CPU seconds
# (PCT thread, node engine, watcher and rank together) against ~3 s of wall time. Root only.
# Usage: bash crates/qk/bench-peers/idle-node-cpu.sh [QK_TEST_RANK_BINARY]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../../target/release/qk-test-rank}"
if [ "$(id -u)" != 0 ]; then echo "idle-node-cpu: needs root (network namespaces)" >&2; exit 1; fi
if [ ! -x "$bin" ]; then
    echo "idle-node-cpu: no $bin (cargo build --release -p qk --bins)" >&2; exit 1
fi
a="idlc$$a"; b="idlc$$b"
cleanup() { ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$a"; ip netns add "$b"
ip link add "vi$$a" netns "$a" type veth peer name "vi$$b" netns "$b"
ip -n "$a" addr add 10.239.1.1/24 dev "vi$$a"; ip -n "$b" addr add 10.239.1.2/24 dev "vi$$b"
for n in "$a" "$b"; do ip -n "$n" link set lo up; done
ip -n "$a" link set "vi$$a" up; ip -n "$b" link set "vi$$b" up
common=(--job 31 --rank-node 0,1 --key idle-node-cpu)
/usr/bin/time -f "node 0 (waiting): CPU user %U s sys %S s, wall %e s" \
    ip netns exec "$a" "$bin" node --node 0 --listen 10.239.1.1:47399 \
    --peer 1=10.239.1.2:47399 "${common[@]}" --cpu 0 -- idle-target --peer 1 --rounds 3 &
/usr/bin/time -f "node 1 (sending): CPU user %U s sys %S s, wall %e s" \
    ip netns exec "$b" "$bin" node --node 1 --listen 10.239.1.2:47399 \
    --peer 0=10.239.1.1:47399 "${common[@]}" --cpu 1 -- idle-initiator --peer 0 --rounds 3 --gap-ms 1000
wait
