#!/bin/bash
# usage (root, from anywhere): tcp-pingpong-netns.sh YOD PINGPONG TAG [PPN]
# two namespaces (+ hub) on a bridge, a PCT in each (the given
# yod's `pct serve`), then `yod -n 2*PPN --ppn PPN pingpong` over the QK node engines (TCP); prints the
# engine threads' CPUs and the ping-pong table. Everything is removed at the end.
YOD=$1; PP=$2; TAG=$3; PPN=${4:-1}
set -u
T=qk8$$; H=${T}h; N0=${T}n0; N1=${T}n1
D=$(mktemp -d /tmp/qk8pp.XXXX)
cleanup() { [ -n "${P0:-}" ] && kill $P0 2>/dev/null; [ -n "${P1:-}" ] && kill $P1 2>/dev/null; sleep 0.3; for n in $H $N0 $N1; do ip netns del $n 2>/dev/null; done; rm -rf $D; }
trap cleanup EXIT
ip netns add $H; ip netns add $N0; ip netns add $N1
ip -n $H link set lo up; ip -n $H link add br0 type bridge; ip -n $H addr add 10.233.0.1/24 dev br0; ip -n $H link set br0 up
i=0; for n in $N0 $N1; do
  ip link add va$T$i netns $H type veth peer name vb$T$i netns $n
  ip -n $H link set va$T$i master br0; ip -n $H link set va$T$i up
  ip -n $n link set lo up; ip -n $n addr add 10.233.0.$((11+i))/24 dev vb$T$i; ip -n $n link set vb$T$i up
  i=$((i+1)); done
$YOD keygen --out $D/key >/dev/null
cat > $D/part.toml <<P
name = "qk8pp$$"
key = "$D/key"
[topology]
kind = "mesh"
dims = [3]

[[node]]
name = "svc"
role = "service"
coords = [0]

[[node]]
name = "n0"
role = "compute"
address = "tcp:10.233.0.11:7070"
coords = [1]

[[node]]
name = "n1"
role = "compute"
address = "tcp:10.233.0.12:7070"
coords = [2]
P
ip netns exec $N0 $YOD pct serve --listen tcp:10.233.0.11:7070 --key $D/key --name n0 --run-dir $D/r0 > $D/p0.out 2>&1 & P0=$!
ip netns exec $N1 $YOD pct serve --listen tcp:10.233.0.12:7070 --key $D/key --name n1 --run-dir $D/r1 > $D/p1.out 2>&1 & P1=$!
sleep 1
( for k in 1 2 3 4 5 6 7 8 9 10; do sleep 0.5; for p in $P0 $P1; do for t in /proc/$p/task/*; do [ "$(cat $t/comm 2>/dev/null)" = "qk-node-engine-" ] && echo "$TAG engine of pct $p: cpus $(grep Cpus_allowed_list $t/status | awk '{print $2}')"; done; done; done | sort -u ) & C=$!
ip netns exec $H env XDG_STATE_HOME=$D/state $YOD -n $((2*PPN)) --ppn $PPN --partition $D/part.toml $PP --iters 2000 --max 1024 2>&1 | sed "s/^/$TAG /"
wait $C
