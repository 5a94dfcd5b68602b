#!/usr/bin/env bash
# Hold our own runtime to the right-weight standard (issue 6, "turn it on ourselves"):
# measure an application core with FTQ while a job launched by `yod --mode <m>` runs, for each
# CPU mode, against the same core with nothing of ours running. Goal per mode: no new periodic
# peak and less than 0.1 % added lost work on the application core.
#
# Usage: self-noise.sh [--cpu N] [--duration 10s] [--modes "heater ..."] [--out DIR]
#                      [--nice -20] [--max-added 0.1] [-- APP [ARGS...]]
#   --cpu       application core to sample (default: the last CPU this process may use)
#   --duration  sampling time per run (default 10s)
#   --modes     CPU modes to try (default: heater msg-coproc compute-coproc virtual-node)
#   --out       where CSVs, reports and comparisons go (default: self-noise-<date>)
#   --nice      nice value for the sampler (negative needs root; default: none)
#   --max-added the added lost work allowed, percent (default 0.1)
#   APP         what follows `yod --mode <m>`: yod's options and the program (default:
#               `-n 2 sleep <duration>`, i.e. just our runtime's own daemons, engines and
#               heartbeats on both cores)
# Environment: PUMA_NOISE, YOD = paths to the binaries (default: target/release, then PATH).
# Exit status: 0 all modes pass, 3 some mode fails the goal, 2 yod or puma-noise missing,
# 1 other errors.
set -euo pipefail

cpu=""
duration="10s"
modes="heater msg-coproc compute-coproc virtual-node"
out=""
nice=()
max_added="0.1"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) cpu="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --modes) modes="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --nice) nice=(--nice "$2"); shift 2 ;;
        --max-added) max_added="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "self-noise.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
    esac
done
app=("$@")

root="$(cd "$(dirname "$0")/../../.." && pwd)"
find_bin() { # name, env override
    local name="$1" override="$2"
    if [ -n "$override" ]; then echo "$override"; return; fi
    for c in "$root/target/release/$name" "$root/target/debug/$name"; do
        if [ -x "$c" ]; then echo "$c"; return; fi
    done
    command -v "$name" || true
}
noise="$(find_bin puma-noise "${PUMA_NOISE:-}")"
yod="$(find_bin yod "${YOD:-}")"
if [ -z "$noise" ] || [ ! -x "$noise" ]; then
    echo "self-noise.sh: puma-noise not found: build it with 'cargo build --release -p noise' or set PUMA_NOISE" >&2
    exit 2
fi
if [ -z "$yod" ] || [ ! -x "$yod" ]; then
    echo "self-noise.sh: yod is missing: no yod binary in target/release, target/debug or PATH." >&2
    echo "  The comparison needs the launcher (crates/yod, 'cargo build --release -p yod') or YOD=/path/to/yod." >&2
    echo "  Until then, the baseline alone can be measured with:" >&2
    echo "    $noise ftq --cpu ${cpu:-1} --duration $duration --report baseline-report" >&2
    exit 2
fi
if [ -z "$cpu" ]; then
    cpu="$(nproc --all 2>/dev/null || echo 1)"
    cpu=$((cpu - 1))
fi
if [ ${#app[@]} -eq 0 ]; then
    secs="${duration%s}"
    app=(-n 2 sleep "$secs")
fi
out="${out:-self-noise-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"

echo "== baseline: cpu $cpu, $duration, nothing of ours running"
"$noise" ftq --quiet --cpu "$cpu" --duration "$duration" "${nice[@]}" \
    -o "$out/baseline.csv" --report "$out/baseline" | tee "$out/baseline.txt"

status=0
summary=()
for m in $modes; do
    echo
    echo "== mode $m: $yod --mode $m ${app[*]}"
    "$noise" ftq --quiet --cpu "$cpu" --duration "$duration" "${nice[@]}" \
        -o "$out/$m.csv" --report "$out/$m" -- "$yod" --mode "$m" "${app[@]}" | tee "$out/$m.txt"
    # A job that failed to launch measures nothing: only a clean exit or a job still running
    # when sampling ended counts.
    job_exit="$(sed -n 's/^command_exit: //p' "$out/$m.txt" | head -n 1)"
    case "$job_exit" in
        "exit status: 0"|"still running at end of sampling"*) ;;
        *)
            summary+=("$m: ERROR the job did not run (command_exit: ${job_exit:-none})")
            status=1
            continue
            ;;
    esac
    set +e
    "$noise" compare "$out/baseline.csv" "$out/$m.csv" --max-added "$max_added" | tee "$out/$m.compare.txt"
    rc=${PIPESTATUS[0]}
    set -e
    case "$rc" in
        0) summary+=("$m: PASS") ;;
        3) summary+=("$m: FAIL (see $out/$m.compare.txt)"); status=3 ;;
        *) summary+=("$m: ERROR $rc"); status=1 ;;
    esac
done
echo
echo "== summary (goal: < $max_added % added lost work and no new periodic peak on cpu $cpu)"
printf '%s\n' "${summary[@]}"
echo "reports: $out/*/report.html"
exit "$status"
