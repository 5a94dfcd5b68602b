#!/usr/bin/env bash
# Builds the QK image: first the ring-3 programs, then the kernel that embeds
# them. Output: $METAL_TARGET_DIR/x86_64-unknown-linux-gnu/release/qk
# (default target dir: metal/target). Usage: metal/build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target_dir="${METAL_TARGET_DIR:-$here/target}"
# The hosted workspace's settings must not leak into the freestanding build.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR CARGO_BUILD_RUSTFLAGS
cd "$here"
common=(--release --target x86_64-unknown-linux-gnu --target-dir "$target_dir")
cargo build "${common[@]}" -p metal-user --bins
export METAL_USER_DIR="$target_dir/x86_64-unknown-linux-gnu/release"
cargo build "${common[@]}" -p metal-kernel
echo "$target_dir/x86_64-unknown-linux-gnu/release/qk"
