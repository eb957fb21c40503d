#!/usr/bin/env bash
# `plasmavmc drill --repo` on a stand-in for a real cluster, for measuring it:
# two hosts served by this checkout's agent (exec), shared storage, a test VM booting
# the test guest with `unknown_nmi_panic`, a bystander VM, and `plasmavmc watch` kept
# alive by a restart loop (as systemd's Restart=always would). Everything lives in a
# temporary folder that is removed at the end; every process started is stopped.
#
#   tests/drill-cluster.sh [drill options...]     e.g. --runs 5 --json
#
# Needs: a release build (cargo build --release) and the test guest (make guest).
# `[restart] window = "5s"` with `--settle 8s`: every exit run is a first failure.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bin=$top/target/release/plasmavmc
kernel=$top/target/guest/vmlinuz
initrd=$top/target/guest/initrd.img
for f in "$bin" "$kernel" "$initrd"; do
    [ -e "$f" ] || { echo "missing $f: run cargo build --release and make guest" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/plasmavmc-cluster-drill-XXXXXX)
repo=$dir/repo
state=$dir/state
loop_pid=
cleanup() {
    touch "$dir/stop"
    [ -n "$loop_pid" ] && kill "$loop_pid" 2>/dev/null || true
    pkill -KILL -f "plasmavmc watch --repo $repo" 2>/dev/null || true
    pkill -KILL -f "agent --stdio --root $dir/" 2>/dev/null || true
    for pid in $(pgrep -f qemu-system); do
        case "$(readlink "/proc/$pid/cwd" 2>/dev/null)" in "$dir"/*) kill -9 "$pid" ;; esac
    done
    rm -rf "$dir"
}
trap cleanup EXIT

mkdir -p "$repo/hosts" "$repo/vms" "$dir/shared"
printf '[timeouts]\nstop = "5s"\n\n[restart]\nwindow = "5s"\n' >"$repo/plasmavmc.toml"
for h in hv1 hv2; do
    cat >"$repo/hosts/$h.toml" <<EOF
exec = ["$bin", "agent", "--stdio", "--root", "$dir/$h"]
memory_mb = 2048
vcpus = 8
shared_storage = "$dir/shared"
storage_pool = "pool"
EOF
done
vm() { # name, extra top-level lines, extra kernel command line
    cat >"$repo/vms/$1.toml" <<EOF
memory_mb = 96
$2
[boot]
kernel = "$kernel"
initrd = "$initrd"
cmdline = "console=ttyS0 quiet panic=-1 $3"

[qemu]
accel = "tcg"
EOF
}
vm drillee "" "unknown_nmi_panic"
vm bystander 'host = "hv1"' ""
git -C "$repo" init -q -b main
git -C "$repo" add -A
git -C "$repo" -c user.name=drill -c user.email=drill@plasmavmc.invalid commit -q -m "a test cluster"

# The service manager: start the daemon again whenever it ends.
(
    while [ ! -e "$dir/stop" ]; do
        "$bin" watch --repo "$repo" --state-dir "$state" --interval 15s || true
        sleep 0.05
    done
) 2>>"$dir/watch.log" &
loop_pid=$!

deadline=$((SECONDS + 120))
until grep -qs 'phase = "running"' "$state/status/vms/drillee.toml" \
    && grep -qs 'phase = "running"' "$state/status/vms/bystander.toml"; do
    [ $SECONDS -lt $deadline ] || { echo "the VMs did not start; see $dir/watch.log" >&2; tail "$dir/watch.log" >&2; exit 1; }
    sleep 0.2
done

"$bin" drill --repo "$repo" --state-dir "$state" --vm drillee --yes-disrupt drillee \
    --supervised --settle 8s "$@"
