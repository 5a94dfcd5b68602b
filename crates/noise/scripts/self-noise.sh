#!/usr/bin/env bash
# Hold our own runtime to the right-weight standard (issue 6, "turn it on ourselves"):
# measure an application core with FTQ while a job launched by `yod --mode <m>` runs, for each
# CPU mode, against the same core with nothing of ours running. Goal per mode: no new periodic
# peak and less than 0.1 % added lost work on the application core.
#
# Runs in rounds: each round measures a baseline, then every mode, so that the machine's slow
# load drifts hit baseline and modes alike; each mode's run is paired with its round's baseline.
# The verdict (`puma-noise judge`) is per mode: added lost work min / median / max over the
# rounds, and the periodic sources found in at least half of a mode's runs but in no baseline.
#
# Usage: self-noise.sh [--cpu N] [--duration 10s] [--repeats 3] [--modes "heater ..."]
#                      [--out DIR] [--nice -20] [--max-added 0.1] [--trace] [--puma-job OP]
#                      [-- APP [ARGS...]]
#   --cpu       application core to sample (default: the last CPU this process may use; yod's
#               default service CPU is the first, so this is an application CPU)
#   --duration  sampling time per run (default 10s)
#   --repeats   rounds (default 3)
#   --modes     CPU modes to try (default: heater msg-coproc compute-coproc virtual-node)
#   --out       where CSVs, reports and comparisons go (default: self-noise-<date>)
#   --nice      nice value for the sampler (negative needs root; default: none)
#   --max-added the median added lost work allowed, percent (default 0.1)
#   --trace     also record, with `perf`, every context switch on the sampled CPU during each
#               mode's run and count those into our own threads (yod, PCT, QK engines): a
#               direct check, immune to other users' noise, that nothing of ours runs there,
#               and the CPU time those threads took there (switch-in to the next switch)
#               (needs perf and root, or perf_event_paranoid <= -1)
#   --puma-job OP  run a real puma job instead of `sleep`: `yod -n 2 examples/wait --op OP`,
#               whose rank 0 (on the first application CPU) waits for the whole run in a puma
#               receive (OP=recv: QK engine attached, spin-then-block) or in a node-local
#               barrier (OP=barrier: the shared collective area).
#               The job starts 2 s before sampling so that its loading (attach, prefault) is
#               not counted; what FTQ sees is a rank waiting in the library on its core
#               (build it with `cargo build --release -p puma --examples`)
#   APP         what follows `yod --mode <m>`: yod's options and the program (default:
#               `-n 2 sleep <duration>`, i.e. just our runtime's own daemons, engines and
#               heartbeats)
# Environment: PUMA_NOISE, YOD = paths to the binaries (default: target/release, then PATH);
# PUMA_SERVICE_CPUS is passed through to yod (see `yod --help`).
# Exit status: 0 all modes pass, 3 some mode fails the goal, 2 yod or puma-noise missing,
# 1 other errors.
set -euo pipefail

cpu=""
duration="10s"
repeats=3
modes="heater msg-coproc compute-coproc virtual-node"
out=""
nice=()
max_added="0.1"
trace=0
puma_job=0
puma_op=recv
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) cpu="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --repeats) repeats="$2"; shift 2 ;;
        --modes) modes="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --nice) nice=(--nice "$2"); shift 2 ;;
        --max-added) max_added="$2"; shift 2 ;;
        --trace) trace=1; shift ;;
        --puma-job)
            case "${2:-}" in
                recv|barrier) puma_job=1; puma_op="$2"; shift 2 ;;
                *) echo "self-noise.sh: --puma-job takes recv or barrier" >&2; exit 1 ;;
            esac ;;
        --) shift; break ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
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
default_app=0
if [ "$puma_job" = 1 ]; then
    if [ ${#app[@]} -gt 0 ]; then
        echo "self-noise.sh: --puma-job and an APP after -- are exclusive" >&2
        exit 1
    fi
    wait_bin="$root/target/release/examples/wait"
    if [ ! -x "$wait_bin" ]; then
        echo "self-noise.sh: --puma-job needs $wait_bin: cargo build --release -p puma --examples" >&2
        exit 2
    fi
    # Rank 0 sleeps through the 2 s lead-in, the sampling and a margin, then releases rank 1.
    app=(-n 2 "$wait_bin" --op "$puma_op" --seconds "$(awk -v d="${duration%s}" 'BEGIN { print d + 3 }')")
elif [ ${#app[@]} -eq 0 ]; then
    secs="${duration%s}"
    app=(-n 2 sleep "$secs")
    default_app=1
fi
# For --trace: the rank's PCT is its parent, yod the PCT's parent.
tid_script='
if [ "$PUMA_RANK" = 0 ]; then
  sleep 0.5
  pct=$PPID
  yod=$(sed -n "s/^PPid:[[:space:]]*//p" /proc/$pct/status)
  for p in $pct $yod; do ls /proc/$p/task; done > "$1"
fi
exec sleep "$2"'
if [ "$trace" = 1 ] && ! command -v perf > /dev/null; then
    echo "self-noise.sh: --trace needs perf (apt-get install linux-perf)" >&2
    exit 2
fi
out="${out:-self-noise-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"

case "$repeats" in ''|*[!0-9]*|0) echo "self-noise.sh: --repeats must be a positive number" >&2; exit 1 ;; esac
if ! [[ "$duration" =~ ^[0-9]+(\.[0-9]+)?s$ ]]; then
    echo "self-noise.sh: --duration takes seconds with an s, e.g. 10s or 2.5s (got '$duration')" >&2
    exit 1
fi

# The thread ids of process $1 and of all its descendants, one per line.
tree_tids() {
    local p c
    for p in "$@"; do
        ls "/proc/$p/task" 2>/dev/null || true
        for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree_tids "$c"; done
    done
}

# With --trace: record every context switch on the sampled CPU for the sampling time (perf
# itself kept off that CPU); sets perf_pid.
start_trace() {
    [ "$trace" = 1 ] || return 0
    local perf_cpu=$(( cpu == 0 ? 1 : 0 ))
    taskset -c "$perf_cpu" perf record -q -e sched:sched_switch -C "$cpu" -o "$d/$m.perf" \
        -- sleep "${duration%s}" > /dev/null 2>&1 &
    perf_pid=$!
}

status=0
errors=()
traced=()
trace_bad=0
for r in $(seq 1 "$repeats"); do
    d="$out/r$r"
    mkdir -p "$d"
    echo "== round $r/$repeats: baseline: cpu $cpu, $duration, nothing of ours running"
    "$noise" ftq --quiet --cpu "$cpu" --duration "$duration" "${nice[@]}" \
        -o "$d/baseline.csv" --report "$d/baseline" > "$d/baseline.txt"
    sed -n 's/^ *\(noise fraction\|cpu [0-9]*:\).*/  &/p' "$d/baseline.txt" | head -n 3
    for m in $modes; do
        echo "== round $r/$repeats: mode $m: $yod --mode $m ${app[*]}"
        perf_pid=""
        job=("${app[@]}")
        if [ "$trace" = 1 ]; then
            rm -f "$d/$m.tids"
            if [ "$default_app" = 1 ]; then
                # Rank 0 writes down the thread ids of its PCT and of yod (other users of this
                # machine may run yods of their own), then the ranks sleep as usual.
                job=(-n 2 sh -c "$tid_script" rank "$d/$m.tids" "${duration%s}")
            fi
        fi
        if [ "$puma_job" = 1 ]; then
            # Start the job first, sample (and trace) once it has loaded, then collect its exit
            # status.
            "$yod" --mode "$m" "${job[@]}" > "$d/$m.job.txt" 2>&1 &
            job_pid=$!
            sleep 2
            # Our threads are those of this yod and its descendants (PCT, ranks, QK engines):
            # other users' (or other sessions') yods on this machine must not count.
            [ "$trace" = 1 ] && tree_tids "$job_pid" > "$d/$m.tids"
            start_trace
            "$noise" ftq --quiet --cpu "$cpu" --duration "$duration" "${nice[@]}" \
                -o "$d/$m.csv" --report "$d/$m" > "$d/$m.txt"
            if wait "$job_pid"; then
                echo "command_exit: exit status: 0" >> "$d/$m.txt"
            else
                echo "command_exit: yod failed ($(tail -n 1 "$d/$m.job.txt"))" >> "$d/$m.txt"
            fi
        else
            start_trace
            "$noise" ftq --quiet --cpu "$cpu" --duration "$duration" "${nice[@]}" \
                -o "$d/$m.csv" --report "$d/$m" -- "$yod" --mode "$m" "${job[@]}" > "$d/$m.txt"
        fi
        if [ -n "$perf_pid" ]; then
            wait "$perf_pid" || true
            # Switches into our threads: yod's and the PCT's by thread id when known, else
            # by name (yod-*, pct-*, qk-* for the QK engines, wait for --puma-job's ranks).
            # One line per switch: time, the thread switched in, its name. A thread runs from
            # its switch-in to the next switch on the CPU, which gives the CPU time our threads
            # took from the sampled core (the last interval runs to the end of the trace).
            perf script -i "$d/$m.perf" -F time,trace 2>/dev/null \
                | sed -n 's/^ *\([0-9.]*\): .*next_comm=\(.*\) next_pid=\([0-9]*\) .*/\1\t\3\t\2/p' \
                > "$d/$m.switches" || true
            if [ -s "$d/$m.tids" ]; then
                awk -F '\t' 'NR == FNR { ours[$1] = 1; next } { print (($2 in ours) ? 1 : 0) "\t" $0 }' \
                    "$d/$m.tids" "$d/$m.switches" > "$d/$m.marked"
            else
                awk -F '\t' '{ print ($3 ~ /^(yod|pct|qk-|wait$)/ ? 1 : 0) "\t" $0 }' \
                    "$d/$m.switches" > "$d/$m.marked"
            fi
            awk -F '\t' '$1 == 1 { print $4 }' "$d/$m.marked" | sort | uniq -c > "$d/$m.ours.txt"
            ours="$(awk '{n += $1} END {print n + 0}' "$d/$m.ours.txt")"
            all="$(wc -l < "$d/$m.switches")"
            ran="$(awk -F '\t' -v dur="${duration%s}" '
                NR > 1 && was_ours { t += $2 - at }
                { was_ours = ($1 == 1); at = $2; if (NR == 1) first = $2 }
                END { if (was_ours) t += first + dur - at;
                      printf "%.1f us = %.5f %%", t * 1e6, t / dur * 100 }' "$d/$m.marked")"
            echo "  our threads switched in on cpu $cpu: $ours of $all switches$( [ "$ours" = 0 ] || echo ": $(tr -s ' \n' ' ' < "$d/$m.ours.txt")"), ran $ran of the run"
            traced+=("round $r, $m: $ours of $all context switches on cpu $cpu were into our threads ($(wc -l < "$d/$m.tids" 2>/dev/null || echo '?') known); they ran $ran of the ${duration} run")
            [ "$ours" = 0 ] || trace_bad=1
        fi
        # A job that failed to launch measures nothing: only a clean exit or a job still
        # running when sampling ended counts.
        job_exit="$(sed -n 's/^command_exit: //p' "$d/$m.txt" | head -n 1)"
        case "$job_exit" in
            "exit status: 0"|"still running at end of sampling"*) ;;
            *)
                errors+=("round $r, $m: the job did not run (command_exit: ${job_exit:-none})")
                status=1
                continue
                ;;
        esac
        # The pairwise comparison, for the details (the verdict is the judge's, below).
        "$noise" compare "$d/baseline.csv" "$d/$m.csv" > "$d/$m.compare.txt" || true
        sed -n 's/^noise fraction.*B-A \(.*\)$/  added \1/p' "$d/$m.compare.txt"
    done
done
if [ ${#errors[@]} -gt 0 ]; then
    printf 'ERROR %s\n' "${errors[@]}" >&2
    echo "self-noise.sh: some jobs did not run; no verdict" >&2
    exit 1
fi

judge=()
for r in $(seq 1 "$repeats"); do judge+=(--baseline "$out/r$r/baseline.csv"); done
for m in $modes; do
    files=""
    for r in $(seq 1 "$repeats"); do files="$files${files:+,}$out/r$r/$m.csv"; done
    judge+=(--mode "$m=$files")
done
echo
echo "== verdict over $repeats round(s), cpu $cpu"
set +e
"$noise" judge "${judge[@]}" --max-added "$max_added" | tee "$out/judge.txt"
rc=${PIPESTATUS[0]}
set -e
case "$rc" in
    0) ;;
    3) status=3 ;;
    *) status=1 ;;
esac
if [ "$trace" = 1 ]; then
    echo
    echo "== context switches into our threads on cpu $cpu (perf, per run; goal 0)"
    printf '%s\n' "${traced[@]}" | tee "$out/trace.txt"
    if [ "$trace_bad" = 1 ] && [ "$status" = 0 ]; then status=3; fi
fi
echo "reports: $out/r*/*/report.html; per-run comparisons: $out/r*/*.compare.txt"
exit "$status"
