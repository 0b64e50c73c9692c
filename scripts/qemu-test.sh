#!/usr/bin/env bash
# Boot StateFS in a QEMU guest (TCG) and check its self-tests on a real virtio disk.
#
#   scripts/qemu-test.sh           4 boots: for encryption off, then on: `selftest` (mkfs +
#                                  the engine's checks), then `persist` on the same disk;
#                                  markers checked after each boot, fsck-statefs on the host
#                                  (encrypted: with the key file of the guest's key disk);
#                                  then power cuts: qemu/powercut.py (crashes over QMP with
#                                  encryption off, then on: the host checks the encrypted
#                                  image with the key file from the guest's key disk; and
#                                  lost write cache states rebuilt from a blklogwrites log).
#   scripts/qemu-test.sh --smoke   one boot: the guest's Python imports StateFS and its deps.
#
# Options: -v (stream the guest consoles), --keep (keep disks and logs).
# Env: QEMU_TEST_TIMEOUT (seconds per boot, default 240), QEMU_DISK_SIZE (default 64M),
#      POWERCUT_ARGS (extra qemu/powercut.py arguments, e.g. "--seed 7 --cycles 5").
# Installs its tools with apt-get and builds the guest (cached) via qemu/build_guest.py.
# How it works: qemu/README.md.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=$REPO/.venv/bin/python
TIMEOUT=${QEMU_TEST_TIMEOUT:-240}
DISK_SIZE=${QEMU_DISK_SIZE:-64M}
SMOKE=0 KEEP=0 ECHO=()
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        --keep) KEEP=1 ;;
        -v) ECHO=(--echo) ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "qemu-test: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done
if [ ! -x "$PY" ]; then
    echo "qemu-test: no venv at $REPO/.venv: create it and pip install the project with [dev]" >&2
    exit 2
fi
cd "$REPO"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c 'import qemu.qmp, packaging' 2>/dev/null; then
    "$PY" -m pip install -q 'qemu.qmp>=0.0.3' packaging || exit 2
fi

WORK=$(mktemp -d /tmp/statefs-qemu.XXXXXX)
FAILURES=()

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T0=$(now)

finish() {
    local total
    total=$(since "$T0")
    if [ ${#FAILURES[@]} -eq 0 ]; then
        echo "qemu-test: PASS ($total s)"
        [ $KEEP = 1 ] && echo "qemu-test: disks and logs kept in $WORK" || rm -rf "$WORK"
        exit 0
    fi
    echo "qemu-test: FAIL ($total s):"
    printf '  - %s\n' "${FAILURES[@]}"
    echo "qemu-test: disks and logs kept in $WORK"
    exit 1
}

fail() {  # what-failed [serial-log]
    FAILURES+=("$1")
    echo "qemu-test: FAIL: $1"
    if [ -n "${2:-}" ] && [ -s "$2" ]; then
        echo "---- last 40 console lines of $2"
        tail -n 40 "$2" | tr -d '\r'
        echo "----"
    fi
}

# boot NAME MODE ENC DISK [STATE_DISK] [run_guest args...]: one boot, then the marker check.
boot() {
    local name=$1 mode=$2 enc=$3 disk=$4 state=${5:-} log=$WORK/$1.log rc start
    local out=$WORK/$1.stdout
    [ ${#ECHO[@]} -gt 0 ] && out=/dev/stdout  # -v: the console streams to the terminal
    local args=(--mode "$mode" --enc "$enc" --disk "$disk" --serial-log "$log"
                --timeout "$TIMEOUT" "${ECHO[@]}" "${@:6}")
    [ -n "$state" ] && args+=(--state-disk "$state")  # created (ext4) if missing
    start=$(now)
    "$PY" qemu/run_guest.py "${args[@]}" >"$out" 2>"$WORK/$name.stderr"
    rc=$?
    printf 'qemu-test: %-18s %6s s  (exit status %s)\n' "$name" "$(since "$start")" "$rc"
    if [ $rc = 124 ] || [ $rc = 125 ]; then  # 125: QEMU ended without a guest status
        sed 's/^/    /' "$WORK/$name.stderr" | tail -n 20
        local why="QEMU ended without a guest status"
        [ $rc = 124 ] && why="timed out after $TIMEOUT s"
        fail "$name: $why" "$log"
        return 1
    fi
    if ! "$PY" qemu/check_markers.py --mode "$mode" --enc "$enc" "$log" >"$WORK/$name.check"; then
        sed 's/^/    /' "$WORK/$name.check"
        fail "$name: markers (see above)" "$log"
        return 1
    fi
    [ $rc = 0 ] || { fail "$name: guest exit status $rc" "$log"; return 1; }
    return 0
}

fsck_image() {  # NAME DISK [KEY_DISK]: with the guest's key disk, sealed chunks are authenticated
    local probe='import importlib.util as u; exit(u.find_spec("fsck_statefs.__main__") is None)'
    local cmd=("$PY" -m fsck_statefs "$2") how=""
    if ! "$PY" -c "$probe" 2>/dev/null; then
        fail "$1: fsck_statefs is missing (no fsck_statefs/__main__.py): cannot check $2"
        return 1
    fi
    if [ -n "${3:-}" ]; then  # a keystored on the host, on the key file of the guest's key disk
        cmd=("$PY" qemu/hostkeys.py --state-disk "$3" -- "${cmd[@]}" --keystore-socket '{socket}')
        how=", every sealed chunk authenticated with the key from the guest's key disk"
    fi
    if ! "${cmd[@]}" >"$WORK/$1.fsck" 2>&1; then
        sed 's/^/    /' "$WORK/$1.fsck" | tail -n 20
        fail "$1: fsck-statefs reported problems on the image"
        return 1
    fi
    if [ -n "${3:-}" ] && ! grep -q '^  authentication: every sealed chunk' "$WORK/$1.fsck"; then
        sed 's/^/    /' "$WORK/$1.fsck" | tail -n 20
        fail "$1: fsck-statefs did not authenticate the sealed chunks"
        return 1
    fi
    echo "qemu-test: $1: fsck-statefs clean$how"
}

B0=$(now)
if ! "$PY" qemu/build_guest.py; then
    fail "guest build"
    finish
fi
echo "qemu-test: guest ready in $(since "$B0") s"

if [ $SMOKE = 1 ]; then
    boot smoke smoke off "$WORK/smoke.img" "" --create "$DISK_SIZE"
    finish
fi

for enc in off on; do
    disk=$WORK/disk-enc-$enc.img
    state=
    [ $enc = on ] && state=$WORK/keys-enc-$enc.img  # keystored's keys must survive the reboot
    if boot "selftest-enc-$enc" selftest $enc "$disk" "$state" --create "$DISK_SIZE"; then
        fsck_image "selftest-enc-$enc" "$disk" "$state"
        boot "persist-enc-$enc" persist $enc "$disk" "$state" &&
            fsck_image "persist-enc-$enc" "$disk" "$state"
    else
        fail "persist-enc-$enc: skipped (the first boot failed)"
    fi
done

# Power cuts on the real guest (qemu/powercut.py): its last line is "guest crash states: N, violations: V".
powercut() {
    local out=$WORK/powercut.out start rc last
    start=$(now)
    # shellcheck disable=SC2086  # POWERCUT_ARGS is a list of arguments
    if [ ${#ECHO[@]} -gt 0 ]; then
        "$PY" qemu/powercut.py --workdir "$WORK/powercut" ${POWERCUT_ARGS:-} 2>&1 | tee "$out"
    else
        "$PY" qemu/powercut.py --workdir "$WORK/powercut" ${POWERCUT_ARGS:-} >"$out" 2>&1
    fi
    rc=$?
    last=$(tail -n 1 "$out")
    printf 'qemu-test: %-18s %6s s  (%s)\n' powercut "$(since "$start")" "$last"
    if [[ ! $last =~ ^guest\ crash\ states:\ ([0-9]+),\ violations:\ ([0-9]+)$ ]]; then
        tail -n 20 "$out" | sed 's/^/    /'
        fail "powercut: no summary line (see $out)"
    elif [ "${BASH_REMATCH[1]}" = 0 ]; then
        tail -n 20 "$out" | sed 's/^/    /'
        fail "powercut: no guest crash state was checked"
    elif [ "${BASH_REMATCH[2]}" != 0 ]; then
        { grep '^powercut: seed' "$out"; grep '^powercut: VIOLATION' "$out" | head -n 4
          grep -E '^powercut: (states with|reproduce)' "$out"; } | sed 's/^/    /'
        fail "powercut: ${BASH_REMATCH[2]} violations in ${BASH_REMATCH[1]} guest crash states (see $out)"
    elif [ $rc != 0 ]; then
        grep '^powercut: ERROR' "$out" | sed 's/^/    /'
        fail "powercut: exit status $rc: a stage could not run (see $out)"
    fi
    # Each stage prints "powercut: stage NAME: N states, V violations"; a stage that
    # checked nothing must not hide behind the others' total.
    local name line shown
    for name in crashes-enc-off crashes-enc-on; do
        [ "$name" = crashes-enc-on ] && [[ " ${POWERCUT_ARGS:-} " =~ \ --enc-cycles[=\ ]0\  ]] && continue
        line=$(grep "^powercut: stage $name: " "$out")
        shown=${line#powercut: }
        printf 'qemu-test: %-18s %s\n' "" "${shown:-no line for stage $name}"
        if [[ ! $line =~ :\ ([0-9]+)\ states, ]] || [ "${BASH_REMATCH[1]}" = 0 ]; then
            fail "powercut: stage $name checked no crash state (see $out)"
        fi
    done
}
powercut
finish
