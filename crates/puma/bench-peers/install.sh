#!/usr/bin/env bash
# Installs MPICH and Open MPI from Debian when missing, then builds the collective peer
# (coll_peer.c) with each mpicc, for puma-coll-bench.
# Usage: bash crates/puma/bench-peers/install.sh [outdir]   (default: target/bench-peers)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../../target/bench-peers}"
mkdir -p "$out"
need=()
for p in mpich libmpich-dev openmpi-bin libopenmpi-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing packages ${need[*]}; run as root to install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
mpicc.mpich -O2 -o "$out/coll_peer.mpich" "$here/coll_peer.c"
mpicc.openmpi -O2 -o "$out/coll_peer.openmpi" "$here/coll_peer.c"
echo "built $out/coll_peer.mpich and $out/coll_peer.openmpi"
