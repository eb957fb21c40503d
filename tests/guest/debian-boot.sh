#!/usr/bin/env bash
# Boot the Debian image (tests/guest/debian.sh) with plain QEMU under TCG and a NoCloud
# seed made by hand, log in over SSH, and print how long each step took: the image
# itself proven without PlasmaVMC, and the figures of BENCHMARKS.md.
#
#   tests/guest/debian-boot.sh [RUNS]      (default 1)
#
# Each run: a fresh qcow2 overlay of target/debian/debian.qcow2, a vfat `cidata` seed
# (mkfs.vfat + mcopy: user-data with a throwaway SSH key, meta-data with a new
# instance-id and local-hostname boot-test), QEMU q35 TCG -smp 2 -m 1024, direct
# kernel boot, user networking restricted to a forward of a free port to the guest's 22.
# Prints, per run: seconds from QEMU's start to the SSH banner, to `hostname` over SSH
# answering boot-test, and to cloud-init's "finished" line on the serial console.
# DEBIAN_BOOT_NETWORK_CONFIG=FILE puts FILE on the seed as network-config.
# DEBIAN_BOOT_KEEP=DIR keeps each run's serial log there (serial-N.log).
# Needs qemu-system-x86_64, qemu-img, mkfs.vfat (dosfstools), mcopy (mtools), ssh.
set -euo pipefail

die() { echo "guest/debian-boot.sh: error: $*" >&2; exit 1; }

RUNS=${1:-1}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
IMG="$REPO_ROOT/target/debian"
[[ -s "$IMG/debian.qcow2" ]] || die "no $IMG/debian.qcow2: run tests/guest/debian.sh first"

WORK=$(mktemp -d)
qemu_pid=""
cleanup() {
    [[ -z "$qemu_pid" ]] || kill "$qemu_pid" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ssh-keygen -q -t ed25519 -N '' -C boot-test -f "$WORK/key"
SSH=(ssh -i "$WORK/key" -o BatchMode=yes -o StrictHostKeyChecking=no
    -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 -o LogLevel=ERROR)

# Seconds since $start, with milliseconds.
since() { echo "$(($(date +%s%N) - start))" | awk '{ printf "%.1f", $1 / 1e9 }'; }

# A TCP port nobody listens on, on 127.0.0.1 (QEMU fails loudly if it is taken meanwhile).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 30000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}

echo "run banner_s ssh_hostname_s cloud_init_done_s"
for run in $(seq 1 "$RUNS"); do
    dir="$WORK/run$run"
    mkdir "$dir"
    cat >"$dir/user-data" <<EOF
#cloud-config
users:
  - name: tester
    shell: /bin/bash
    ssh_authorized_keys:
      - $(cat "$WORK/key.pub")
EOF
    printf 'instance-id: boot-test-%s-%s\nlocal-hostname: boot-test\n' "$$" "$run" >"$dir/meta-data"
    truncate -s 1M "$dir/seed.img"
    mkfs.vfat -n cidata "$dir/seed.img" >/dev/null 2>&1
    mcopy -i "$dir/seed.img" "$dir/user-data" "$dir/meta-data" ::
    if [[ -n "${DEBIAN_BOOT_NETWORK_CONFIG:-}" ]]; then
        mcopy -i "$dir/seed.img" "$DEBIAN_BOOT_NETWORK_CONFIG" ::network-config
    fi
    qemu-img create -q -f qcow2 -F qcow2 -b "$IMG/debian.qcow2" "$dir/disk.qcow2"
    port=$(free_port)

    start=$(date +%s%N)
    qemu-system-x86_64 -machine q35,accel=tcg -smp 2 -m 1024 -nodefaults -no-user-config \
        -display none -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0" \
        -chardev file,id=s0,path="$dir/serial.log" -serial chardev:s0 \
        -drive file="$dir/disk.qcow2",if=virtio,format=qcow2 \
        -drive file="$dir/seed.img",if=virtio,format=raw,readonly=on \
        -device virtio-rng-pci \
        -netdev user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:"$port"-:22 \
        -device virtio-net-pci,netdev=n0 2>"$dir/qemu.log" &
    qemu_pid=$!

    banner="" hostname_at="" done_at=""
    deadline=$((SECONDS + 300))
    while [[ -z "$done_at" || -z "$hostname_at" ]]; do
        ((SECONDS < deadline)) || { [[ -z "${DEBIAN_BOOT_KEEP:-}" ]] || cp "$dir/serial.log" "$DEBIAN_BOOT_KEEP/serial-$run.log"; die "run $run: no login within 300 s; serial log: $(tail -n 20 "$dir/serial.log")"; }
        kill -0 "$qemu_pid" 2>/dev/null || die "run $run: QEMU exited: $(cat "$dir/qemu.log")"
        # slirp accepts the TCP connection before the guest listens: wait for sshd's banner.
        if [[ -z "$banner" ]] &&
            timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && head -c 4 <&3" 2>/dev/null | grep -q '^SSH-'; then
            banner=$(since)
        fi
        if [[ -n "$banner" && -z "$hostname_at" ]] &&
            [[ "$("${SSH[@]}" -p "$port" tester@127.0.0.1 hostname 2>/dev/null)" == boot-test ]]; then
            hostname_at=$(since)
        fi
        if [[ -z "$done_at" ]] && grep -q 'Cloud-init v.* finished at' "$dir/serial.log" 2>/dev/null; then
            done_at=$(since)
        fi
        sleep 0.2
    done
    echo "$run $banner $hostname_at $done_at"
    [[ -z "${DEBIAN_BOOT_NETWORK_CONFIG:-}" ]] || "${SSH[@]}" -p "$port" tester@127.0.0.1 ip -4 -o addr show scope global
    [[ -z "${DEBIAN_BOOT_KEEP:-}" ]] || cp "$dir/serial.log" "$DEBIAN_BOOT_KEEP/serial-$run.log"
    kill "$qemu_pid"
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
done
