#!/bin/sh
# The GPU kit's runner, copied into .gpu-bundle/run.sh by scripts/gpu-bundle. It runs on a lent
# GPU machine from the bundle alone: no cargo, no python, no network.
#
#   sh .gpu-bundle/run.sh OUTDIR [--device cuda|emu|cpu] [--quick] [--budget SECONDS]
#
# Steps, cheapest and most telling first, each under its own `timeout` and all within the
# budget (default 450 s, under 8 minutes; a step that would not fit is skipped and says so):
# nvidia-smi -L, hiermd devices, hiermd selfcheck (first with CUDA_LAUNCH_BLOCKING=1, so a fault
# names its kernel; then asynchronous, as real runs are), hiermd bench kernels, bench token at
# w = 1, 2, 4, 8, bench attention at 3,200 tokens (forward and training, f32 and bf16), a short
# bench scaling, and hiermd demo on the device. After every step OUTDIR/summary.md,
# OUTDIR/summary.json and OUTDIR/logs.tar.gz are rewritten, so a run stopped from outside still
# hands back what it did. OUTDIR holds at most 4 files (those and selfcheck.json). Exit status:
# 0 when every step that ran passed, 1 otherwise.
set -u

usage() {
    echo "usage: sh run.sh OUTDIR [--device cuda|emu|cpu] [--quick] [--budget SECONDS]" >&2
    exit 2
}
[ $# -ge 1 ] || usage
out=$1
shift
device=cuda
quick=
cublas=
budget=450
while [ $# -gt 0 ]; do
    case $1 in
        --device) [ $# -ge 2 ] || usage; device=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --budget) [ $# -ge 2 ] || usage; budget=$2; shift 2 ;;
        *) usage ;;
    esac
done
case $device in cuda | cuda:* | emu | cpu) ;; *) usage ;; esac

here=$(cd "$(dirname "$0")" && pwd)
hiermd=$here/hiermd
[ -x "$hiermd" ] || { echo "run.sh: $hiermd is missing: build the bundle with scripts/gpu-bundle" >&2; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/hiermd-gpu-run.XXXXXX") || exit 2
logs=$work/logs
mkdir -p "$logs"
trap 'rm -rf "$work"' EXIT
# The driver's JIT compiles each PTX module once per machine; later processes (every selfcheck
# family runs in its own) find it in the cache.
export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-${TMPDIR:-/tmp}/hiermd-jit-cache}"
export CUDA_CACHE_MAXSIZE="${CUDA_CACHE_MAXSIZE:-4294967296}"
mkdir -p "$CUDA_CACHE_PATH" 2>/dev/null

# cuBLAS (the optional GEMM path) is loaded at run time when found. On the lent machines it
# comes inside python's nvidia-cublas wheel, off the library path: look for it, briefly.
if [ "$device" != emu ] && [ "$device" != cpu ]; then
    cublas=$(timeout 10 find /usr/local/lib /usr/lib /opt "${HOME:-/root}/.local" -maxdepth 8 \
        -name 'libcublas.so*' 2>/dev/null | head -n 1)
    if [ -n "$cublas" ]; then
        export LD_LIBRARY_PATH="$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi

now() { date +%s; }
start=$(now)
failed=0
steps_json=
# Markdown and JSON heads.
commit=$(cat "$here/COMMIT" 2>/dev/null | head -n 1)
host=$(uname -n)
{
    echo "# hiermd GPU kit: $device${quick:+ (quick)}"
    echo
    echo "- bundle commit: ${commit:-unknown}"
    echo "- machine: $host, $(nproc 2>/dev/null || echo '?') cores, started $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- budget: $budget s; JIT cache: $CUDA_CACHE_PATH; cuBLAS: ${cublas:-not looked for or not found}"
    echo
} >"$work/summary.md"

# json_str TEXT: TEXT as a JSON string (backslash, quote and control characters escaped).
json_str() {
    printf '%s' "$1" | awk 'BEGIN { ORS = "" } {
        gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); gsub(/\t/, "\\t"); gsub(/\r/, "");
        if (NR > 1) print "\\n"; print
    }' | sed -e 's/^/"/' -e 's/$/"/'
}

# publish: write the summaries and the log archive into OUTDIR (each by rename, never half).
publish() {
    elapsed=$(($(now) - start))
    cp "$work/summary.md" "$out/.summary.md.tmp" && mv "$out/.summary.md.tmp" "$out/summary.md"
    {
        printf '{"device": %s, "quick": %s, "commit": %s, "host": %s, "budget_s": %s, "elapsed_s": %s, "failed_steps": %s, "steps": [%s]}\n' \
            "$(json_str "$device")" "$([ -n "$quick" ] && echo true || echo false)" \
            "$(json_str "${commit:-unknown}")" "$(json_str "$host")" "$budget" "$elapsed" \
            "$failed" "$steps_json"
    } >"$out/.summary.json.tmp" && mv "$out/.summary.json.tmp" "$out/summary.json"
    tar -czf "$out/.logs.tar.gz.tmp" -C "$work" logs 2>/dev/null && mv "$out/.logs.tar.gz.tmp" "$out/logs.tar.gz"
}

# step NAME LIMIT_S SHOW CMD...: runs CMD under `timeout`, its output in logs/NAME.log; SHOW is
# how much of the output goes into summary.md: `all`, `tail` (last 30 lines) or `last` (the
# last line, a benchmark's JSON row). Skipped when fewer than LIMIT_S/3 seconds of the budget
# are left; the limit is cut to what is left.
step() {
    name=$1 limit=$2 show=$3
    shift 3
    left=$((budget - ($(now) - start)))
    log=$logs/$name.log
    if [ "$left" -lt $((limit / 3 + 5)) ]; then
        status=skipped rc=-1 secs=0
        printf '## %s: skipped (%s s of the budget left, the step needs up to %s s)\n\n' "$name" "$left" "$limit" >>"$work/summary.md"
    else
        [ "$limit" -gt "$left" ] && limit=$left
        echo "run.sh: $name (limit $limit s): $*" >&2
        t0=$(now)
        timeout -k 10 "$limit" "$@" >"$log" 2>&1
        rc=$?
        secs=$(($(now) - t0))
        case $rc in
            0) status=ok ;;
            124 | 137) status=timeout; failed=$((failed + 1)) ;;
            *) status=failed; failed=$((failed + 1)) ;;
        esac
        printf '## %s: %s (exit %s, %s s)\n\n`%s`\n\n```\n' "$name" "$status" "$rc" "$secs" "$*" >>"$work/summary.md"
        case $show in
            all) cat "$log" ;;
            tail) tail -n 30 "$log" ;;
            last) grep -v '^hiermd: device' "$log" | tail -n 1 ;;
        esac >>"$work/summary.md"
        printf '```\n\n' >>"$work/summary.md"
        echo "run.sh: $name: $status (exit $rc, $secs s)" >&2
    fi
    result=null
    if [ "$show" = last ] && [ "$status" = ok ]; then
        line=$(grep -v '^hiermd: device' "$log" | tail -n 1)
        case $line in "{"*"}") result=$line ;; esac
    fi
    entry=$(printf '{"name": %s, "command": %s, "status": "%s", "exit": %s, "seconds": %s, "result": %s}' \
        "$(json_str "$name")" "$(json_str "$*")" "$status" "$rc" "$secs" "$result")
    steps_json=${steps_json:+$steps_json, }$entry
    publish
}

if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi 20 all nvidia-smi -L
fi
step devices 30 all "$hiermd" devices
if [ -n "$quick" ]; then
    step selfcheck 240 tail "$hiermd" --device "$device" selfcheck --quick --json "$logs/selfcheck.json"
else
    # The first pass names a faulty kernel for certain; the second runs asynchronously, as real
    # runs do, where missing stream ordering would show.
    step selfcheck-blocking 150 tail env CUDA_LAUNCH_BLOCKING=1 "$hiermd" --device "$device" selfcheck --json "$logs/selfcheck.json"
    step selfcheck-async 120 tail "$hiermd" --device "$device" selfcheck --json "$logs/selfcheck-async.json"
fi
[ -f "$logs/selfcheck.json" ] && cp "$logs/selfcheck.json" "$out/selfcheck.json"
publish

if [ -n "$quick" ]; then
    step bench-kernels 120 tail "$hiermd" --device "$device" bench kernels --quick --json "$logs/bench-kernels.json"
    for w in 1 2; do
        step "bench-token-w$w" 60 last "$hiermd" --device "$device" bench token --window "$w" --residues 24 --batch 4 --blocks 1 --warmup 0 --repeats 1
    done
    step bench-attention-f32-train 60 last "$hiermd" --device "$device" bench attention --tokens 128 --backward --warmup 0 --repeats 1
    step bench-attention-bf16-train 60 last "$hiermd" --device "$device" bench attention --tokens 128 --dtype bf16 --backward --warmup 0 --repeats 1
    step bench-scaling 120 tail "$hiermd" --device "$device" bench scaling --residues 24,48 --windows 1,4 --graph-conv none,cheap --batch 2 --blocks 1 --repeats 1 --point-timeout 60 --out "$logs/scaling"
    step demo 330 tail "$hiermd" --device "$device" demo --quick --frames 400 --data "$here/data/alanine" --out "$work/demo"
else
    step bench-kernels 90 tail "$hiermd" --device "$device" bench kernels --json "$logs/bench-kernels.json"
    for w in 1 2 4 8; do
        step "bench-token-w$w" 45 last "$hiermd" --device "$device" bench token --window "$w"
    done
    for dt in f32 bf16; do
        step "bench-attention-$dt-fwd" 30 last "$hiermd" --device "$device" bench attention --tokens 3200 --batch 8 --dtype "$dt"
        step "bench-attention-$dt-train" 40 last "$hiermd" --device "$device" bench attention --tokens 3200 --batch 8 --dtype "$dt" --backward
    done
    step bench-scaling 90 tail "$hiermd" --device "$device" bench scaling --residues 200,1000,3000 --windows 1,8 --graph-conv none,cheap --repeats 1 --point-timeout 30 --out "$logs/scaling"
    step demo 120 tail "$hiermd" --device "$device" demo --data "$here/data/alanine" --out "$work/demo"
fi
[ -f "$work/demo/demo.json" ] && cp "$work/demo/demo.json" "$logs/demo.json"
{
    echo "## total: $(($(now) - start)) s, $failed failed step(s)"
} >>"$work/summary.md"
publish
echo "run.sh: done in $(($(now) - start)) s, $failed failed step(s); summary in $out/summary.md" >&2
[ "$failed" -eq 0 ]
