#!/usr/bin/env bash
# Build a real Debian 12 guest from Debian packages, for the real-image e2e test
# (tests/real_guest.rs) and examples/cloud-init.
#
#   tests/guest/debian.sh [--force]
#
# Outputs (relative to the repository root):
#   target/debian/debian.qcow2    ext4 root filesystem on the whole disk (no partition
#                                 table), label debian-root; boots by direct kernel boot
#   target/debian/vmlinuz         the image's own kernel (linux-image-cloud-amd64)
#   target/debian/initrd.img      the image's own initramfs (initramfs-tools)
#   target/debian/manifest.txt    the packages and versions in the image
#   target/debian/script.sha256   the sha256 of this script the outputs were built by
# Kernel command line: root=/dev/vda rw console=ttyS0 (see tests/guest/README.md).
#
# Cached: when script.sha256 matches this script and every output is there, it says so
# and exits 0. Atomic: it builds in a temporary folder beside target/debian and renames
# it into place, so target/debian is always a whole build or absent.
#
# Needs root (mmdebstrap's root mode; mkfs.ext4 -d keeps the owners of the files it
# copies), mmdebstrap, mkfs.ext4 (e2fsprogs), qemu-img, and Debian's package mirrors
# (DEBIAN_MIRROR, default http://deb.debian.org/debian). .ci/install-deps installs the
# tools. Build time: BENCHMARKS.md.
set -euo pipefail

die() { echo "guest/debian.sh: error: $*" >&2; exit 1; }
log() { echo "guest/debian.sh: $*" >&2; }

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (usage: tests/guest/debian.sh [--force])" ;;
esac

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
OUT="$REPO_ROOT/target/debian"
OUTPUTS=(debian.qcow2 vmlinuz initrd.img manifest.txt)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# The root filesystem's size (the qcow2 stores only what is used, ~415 MB).
DISK_SIZE=2G
PACKAGES=linux-image-cloud-amd64,systemd-sysv,udev,dbus,cloud-init,openssh-server,qemu-guest-agent,netbase,iproute2,sudo

digest=$(sha256sum "$SCRIPT" | cut -d' ' -f1)

# --- up to date? ------------------------------------------------------------------
up_to_date() {
    [[ -f "$OUT/script.sha256" && "$(cat "$OUT/script.sha256")" == "$digest" ]] || return 1
    local f
    for f in "${OUTPUTS[@]}"; do
        [[ -s "$OUT/$f" ]] || return 1
    done
}
if [[ $force -eq 0 ]] && up_to_date; then
    log "image already built by this script: $OUT/{debian.qcow2,vmlinuz,initrd.img} (--force rebuilds)"
    exit 0
fi

# --- tools --------------------------------------------------------------------------
[[ $EUID -eq 0 ]] || die "needs root (mmdebstrap's root mode, and mkfs.ext4 -d keeps file owners); run it with sudo"
missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
[[ ${#missing[@]} -eq 0 ]] || die "missing tools; install with: apt-get install -y ${missing[*]} (or run .ci/install-deps)"

# --- build in a temporary folder -----------------------------------------------------------
mkdir -p "$REPO_ROOT/target"
WORK=$(mktemp -d "$REPO_ROOT/target/.debian.XXXXXX")
# --one-file-system: never follow a mount mmdebstrap might have left in the root tree.
trap 'rm -rf --one-file-system "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
started=$SECONDS

# The guest's own configuration, written by mmdebstrap's customize hooks below.
CLOUD_CFG=$(
    cat <<'EOF'
# PlasmaVMC's test image (tests/guest/debian.sh): NoCloud only, and what makes the
# first boot fast under TCG.
datasource_list: [NoCloud, None]
# rsa and ecdsa host keys cost 3-7 s of CPU each under TCG.
ssh_genkeytypes: [ed25519]
manage_etc_hosts: true
# Debian's lists without what this image cannot do or need: no locale (the image has no
# `locales` package, and the module's failure marks cloud-init in error), no growpart
# (the root filesystem is the whole disk), no apt, snap, ntp, puppet, chef or landscape.
cloud_init_modules:
  - migrator
  - seed_random
  - bootcmd
  - write_files
  - resizefs
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - users_groups
  - ssh
cloud_config_modules:
  - set_passwords
  - timezone
  - runcmd
cloud_final_modules:
  - package_update_upgrade_install
  - write_files_deferred
  - scripts_vendor
  - scripts_per_once
  - scripts_per_boot
  - scripts_per_instance
  - scripts_user
  - ssh_authkey_fingerprints
  - keys_to_console
  - final_message
  - power_state_change
EOF
)

log "mmdebstrap: Debian 12 minbase + $PACKAGES"
# Sources are given on the command line: without them mmdebstrap reads them from a
# stdin that is not a terminal (as under make or a test).
mmdebstrap --mode=root --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='echo "LABEL=debian-root / ext4 rw,errors=remount-ro 0 1" >"$1/etc/fstab"' \
    --customize-hook='echo localhost >"$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n" >"$1/etc/hosts"' \
    --customize-hook='echo "nameserver 10.0.2.3" >"$1/etc/resolv.conf"' \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook="cat >\"\$1/etc/cloud/cloud.cfg.d/90-plasmavmc.cfg\" <<'EOF'
$CLOUD_CFG
EOF" \
    --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" >"$1/.manifest"' \
    bookworm "$ROOTFS" \
    "deb $MIRROR bookworm main" \
    "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main" </dev/null >&2
log "rootfs: $(du -sh --one-file-system "$ROOTFS" | cut -f1) after $((SECONDS - started)) s"

mkdir "$WORK/out"
mv "$ROOTFS/.manifest" "$WORK/out/manifest.txt"
vmlinuz=$(find "$ROOTFS/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
initrd=$(find "$ROOTFS/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -n 1)
[[ -n "$vmlinuz" && -n "$initrd" ]] || die "no /boot/vmlinuz-* or /boot/initrd.img-* in the image"
cp "$vmlinuz" "$WORK/out/vmlinuz"
cp "$initrd" "$WORK/out/initrd.img"

truncate -s "$DISK_SIZE" "$WORK/root.raw"
mkfs.ext4 -q -L debian-root -d "$ROOTFS" "$WORK/root.raw"
qemu-img convert -f raw -O qcow2 "$WORK/root.raw" "$WORK/out/debian.qcow2"
rm -f "$WORK/root.raw"
echo "$digest" >"$WORK/out/script.sha256"

# --- publish: one rename (the old build, if any, goes away after) ----------------------------
if [[ -e "$OUT" ]]; then
    mv "$OUT" "$WORK/old"
fi
mv "$WORK/out" "$OUT"
log "built $OUT/debian.qcow2 ($(du -h "$OUT/debian.qcow2" | cut -f1)), kernel $(basename "$vmlinuz"), in $((SECONDS - started)) s"
