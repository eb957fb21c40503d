#!/usr/bin/env bash
# Builds target/guest/boot.img: the test guest as a bootable disk image (raw, FAT,
# SYSLINUX), for what boots through the firmware from an image rather than from a
# kernel and initrd given to QEMU (`plasmavmc drill --image`). It boots the same
# vmlinuz and initrd.img with `plasmavmc.disk=/dev/vdb`: the image is the VM's first
# disk, so the boot counter goes to the second one (if any).
#
# Needs syslinux, mtools and dosfstools (.ci/install-deps installs them). Called by
# build.sh; rebuilds only when the image is older than the kernel or initrd.
set -euo pipefail

OUT=${1:?usage: boot-image.sh OUT_DIR}
img=$OUT/boot.img
die() { echo "guest/boot-image.sh: error: $*" >&2; exit 1; }

for f in "$OUT/vmlinuz" "$OUT/initrd.img"; do [[ -f "$f" ]] || die "missing $f"; done
if [[ -f "$img" && "$img" -nt "$OUT/vmlinuz" && "$img" -nt "$OUT/initrd.img" &&
      "$img" -nt "${BASH_SOURCE[0]}" ]]; then
    exit 0
fi
for tool in syslinux mkfs.vfat mcopy; do
    command -v "$tool" >/dev/null || die "missing $tool; install with: apt-get install -y syslinux mtools dosfstools"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
truncate -s 48M "$work/boot.img"
mkfs.vfat -n PLASMAVMC "$work/boot.img" >/dev/null
syslinux --install "$work/boot.img"
cat >"$work/syslinux.cfg" <<'CFG'
DEFAULT guest
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL guest
  KERNEL vmlinuz
  APPEND initrd=initrd.img console=ttyS0 quiet panic=-1 plasmavmc.disk=/dev/vdb
CFG
mcopy -i "$work/boot.img" "$OUT/vmlinuz" "$OUT/initrd.img" "$work/syslinux.cfg" ::/
mv -f "$work/boot.img" "$img"
echo "guest/boot-image.sh: built $img" >&2
