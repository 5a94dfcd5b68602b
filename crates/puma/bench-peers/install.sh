#!/usr/bin/env bash
# Installs MPICH and Open MPI from Debian when missing (through the QK's peer installer, which
# also builds its point-to-point peer), then builds the collective peer (coll_peer.c) with each
# mpicc, for puma-coll-bench.
# Usage: bash crates/puma/bench-peers/install.sh [outdir]   (default: target/bench-peers)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../../target/bench-peers}"
bash "$here/../../qk/bench-peers/install.sh" "$out"
mpicc.mpich -O2 -o "$out/coll_peer.mpich" "$here/coll_peer.c"
mpicc.openmpi -O2 -o "$out/coll_peer.openmpi" "$here/coll_peer.c"
echo "built $out/coll_peer.mpich and $out/coll_peer.openmpi"
