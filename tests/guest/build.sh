#!/usr/bin/env bash
# Build the tiny Linux test guest used by PlasmaVMC examples and e2e tests.
#
#   tests/guest/build.sh [--force] [--install DIR] [--flavour generic]
#
# Outputs (relative to the repository root):
#   target/guest/vmlinuz       Debian 12 cloud kernel (linux-image-cloud-amd64)
#   target/guest/initrd.img    gzip'd newc cpio: static busybox + /init (init.sh)
#   target/guest/manifest.txt  exact package versions used
#   target/guest/generic/      the same guest on Debian's generic kernel
#                              (linux-image-amd64), whose initrd also loads the
#                              i6300esb watchdog driver the cloud kernel lacks
#                              (built after the default one; only watchdog tests use it)
# Downloaded .debs are kept in target/guest/cache/.
#
# Needs: apt-get, apt-cache, dpkg, dpkg-deb, cpio, gzip, and access to the
# Debian package mirrors configured in apt. Never installs host packages.
# See tests/guest/README.md.
set -euo pipefail

die() { echo "guest/build.sh: error: $*" >&2; exit 1; }
log() { echo "guest/build.sh: $*" >&2; }

usage() {
    cat <<'EOF'
usage: tests/guest/build.sh [--force] [--install DIR]

  --force        rebuild even if target/guest/{vmlinuz,initrd.img} are up to date
                 (boot.img, the same guest as a bootable disk image, follows them)
  --install DIR  afterwards copy vmlinuz and initrd.img into DIR (created if needed)
  --flavour generic
                 build only target/guest/generic/ (the generic kernel with a watchdog
                 driver); without it the default guest is built, then this one
EOF
}

force=0
install_dir=""
flavour=cloud
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) force=1 ;;
        --install)
            [[ $# -ge 2 && -n "$2" ]] || die "--install needs a directory argument"
            install_dir=$2
            shift
            ;;
        --install=*) install_dir=${1#--install=} ;;
        --flavour)
            [[ $# -ge 2 && "$2" == generic ]] || die "--flavour takes: generic"
            flavour=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
INIT_SRC="$SCRIPT_DIR/init.sh"
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd -P)
OUT="$REPO_ROOT/target/guest"
CACHE="$OUT/cache"

KERNEL_META=linux-image-cloud-amd64
KERNEL_RE='^linux-image-.*-cloud-amd64$'
BUSYBOX_PKG=busybox-static
# Kernel modules the guest needs (Debian's cloud kernel builds them as =m).
# Their dependencies are resolved from each module's modinfo "depends=".
MODULES=(virtio_pci virtio_blk virtio_net virtio_console pvpanic_mmio pvpanic_pci button evdev)
if [[ $flavour == generic ]]; then
    # The generic kernel, for its i6300esb watchdog driver (the cloud kernel has none).
    KERNEL_META=linux-image-amd64
    KERNEL_RE='^linux-image-[0-9].*-amd64$'
    MODULES+=(i6300esb)
    CACHE="$OUT/cache"
    OUT="$OUT/generic"
    [[ -z "$install_dir" ]] || die "--install is for the default guest only"
fi

[[ -f "$INIT_SRC" ]] || die "missing $INIT_SRC"

# The same guest as a bootable disk image (only `drill --image` and its test need it):
# a missing tool leaves it unbuilt with a warning, it does not fail the guest.
# The default build then builds the generic flavour too.
boot_image() {
    [[ $flavour == cloud ]] || return 0
    bash "$SCRIPT_DIR/boot-image.sh" "$OUT" ||
        log "warning: target/guest/boot.img not built (see above); the rest of the guest is"
    local again=()
    [[ $force -eq 0 ]] || again=(--force)
    bash "$SCRIPT" "${again[@]}" --flavour generic
}

install_outputs() {
    [[ -n "$install_dir" ]] || return 0
    mkdir -p "$install_dir"
    cp -f "$OUT/vmlinuz" "$OUT/initrd.img" "$install_dir/"
    log "installed vmlinuz and initrd.img into $install_dir"
}

# --- up to date? ------------------------------------------------------------
if [[ $force -eq 0 && -f "$OUT/vmlinuz" && -f "$OUT/initrd.img" &&
      "$OUT/vmlinuz" -nt "$SCRIPT" && "$OUT/initrd.img" -nt "$SCRIPT" &&
      "$OUT/initrd.img" -nt "$INIT_SRC" ]]; then
    log "guest already built and up to date: $OUT/{vmlinuz,initrd.img} (use --force to rebuild)"
    boot_image
    install_outputs
    exit 0
fi

# --- tools --------------------------------------------------------------------
pkg_for_tool() {
    case "$1" in
        apt-get | apt-cache) echo apt ;;
        dpkg | dpkg-deb) echo dpkg ;;
        cpio) echo cpio ;;
        gzip) echo gzip ;;
        *) echo "$1" ;;
    esac
}
missing=()
for tool in apt-get apt-cache dpkg dpkg-deb cpio gzip find sort; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    pkgs=""
    for tool in "${missing[@]}"; do pkgs+=" $(pkg_for_tool "$tool")"; done
    die "missing required tool(s): ${missing[*]}; install with: apt-get install -y$pkgs"
fi

# --- fetching .debs -----------------------------------------------------------
APT_OPTS=(-q -o Dpkg::Use-Pty=0)
if [[ $EUID -eq 0 ]]; then
    # The cache dir is usually not readable by the _apt sandbox user.
    APT_OPTS+=(-o APT::Sandbox::User=root)
fi
apt_updated=0

apt_update() {
    [[ $apt_updated -eq 0 ]] || return 1
    apt_updated=1
    if [[ $EUID -ne 0 ]]; then
        log "not root: cannot run apt-get update"
        return 1
    fi
    log "running apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" update >&2 ||
        die "apt-get update failed (no access to the Debian package mirrors?)"
}

candidate() { # pkg -> candidate version (empty if none)
    apt-cache policy "$1" 2>/dev/null | awk '/^ *Candidate:/ { print $2; exit }' |
        grep -v '^(none)$' || true
}

# fetch_deb PKG -> prints the path of PKG's candidate .deb in $CACHE
fetch_deb() {
    local pkg=$1 ver file
    ver=$(candidate "$pkg")
    if [[ -z "$ver" ]]; then
        apt_update || true
        ver=$(candidate "$pkg")
    fi
    [[ -n "$ver" ]] || die "apt knows no candidate for package '$pkg' (is a Debian 12 'bookworm' main source configured?)"

    # apt-get download names files <pkg>_<version with ':' as %3a>_<arch>.deb
    file=$(find "$CACHE" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n 1)
    if [[ -z "$file" ]]; then
        log "downloading $pkg=$ver"
        if ! (cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "$pkg=$ver" >&2); then
            if apt_update; then
                ver=$(candidate "$pkg")
                (cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "$pkg=$ver" >&2) ||
                    die "apt-get download $pkg=$ver failed (no access to the Debian package mirrors?)"
            else
                die "apt-get download $pkg=$ver failed (no access to the Debian package mirrors?)"
            fi
        fi
        file=$(find "$CACHE" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n 1)
        [[ -n "$file" ]] || die "apt-get download $pkg=$ver reported success but no .deb appeared in $CACHE"
    else
        log "using cached $(basename "$file")"
    fi
    echo "$file"
}

mkdir -p "$CACHE" "$OUT"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- kernel ---------------------------------------------------------------------
meta_deb=$(fetch_deb "$KERNEL_META")
kernel_pkg=$(dpkg-deb -f "$meta_deb" Depends | tr ',|' '\n\n' | sed 's/(.*//; s/[[:space:]]//g' |
    grep -E "$KERNEL_RE" | head -n 1 || true)
[[ -n "$kernel_pkg" ]] || die "cannot find the kernel package dependency of $(basename "$meta_deb")"
kernel_deb=$(fetch_deb "$kernel_pkg")
kernel_ver=$(dpkg-deb -f "$kernel_deb" Version)

log "unpacking $(basename "$kernel_deb")"
dpkg -x "$kernel_deb" "$WORK/kernel"
vmlinuz=$(find "$WORK/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
[[ -n "$vmlinuz" ]] || die "no boot/vmlinuz-* in $(basename "$kernel_deb")"
kabi=${vmlinuz##*/vmlinuz-}
moddir="$WORK/kernel/lib/modules/$kabi"
[[ -d "$moddir" ]] || die "no lib/modules/$kabi in $(basename "$kernel_deb")"

# --- busybox ----------------------------------------------------------------------
busybox_deb=$(fetch_deb "$BUSYBOX_PKG")
busybox_ver=$(dpkg-deb -f "$busybox_deb" Version)
dpkg -x "$busybox_deb" "$WORK/busybox"
[[ -f "$WORK/busybox/bin/busybox" ]] || die "no /bin/busybox in $(basename "$busybox_deb")"

# --- initramfs tree -----------------------------------------------------------------
root="$WORK/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,lib/modules/"$kabi"}
cp "$WORK/busybox/bin/busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$INIT_SRC" "$root/init"
chmod 0755 "$root/init"

# Kernel modules, in load order (dependencies first).
declare -A ko_path=()
while IFS= read -r ko; do
    name=$(basename "$ko" .ko)
    ko_path[${name//-/_}]=$ko
done < <(find "$moddir/kernel" -name '*.ko')

declare -A loaded=()
load_order=()
add_module() {
    local name=${1//-/_} path deps dep
    [[ -z "${loaded[$name]:-}" ]] || return 0
    loaded[$name]=1
    path=${ko_path[$name]:-}
    if [[ -z "$path" ]]; then
        # Not a module: fine if the kernel has it built in.
        if grep -qx "$name" <(sed 's#.*/##; s#\.ko$##; s#-#_#g' "$moddir/modules.builtin" 2>/dev/null); then
            return 0
        fi
        die "kernel module '$name' is neither in $kernel_pkg nor built in"
    fi
    deps=$(tr '\0' '\n' <"$path" | grep -a '^depends=' | head -n 1 | sed 's/^depends=//' || true)
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    load_order+=("$path")
}
for m in "${MODULES[@]}"; do
    add_module "$m"
done
: >"$root/etc/modules.load"
for path in "${load_order[@]}"; do
    rel=${path#"$WORK/kernel"}
    mkdir -p "$root$(dirname "$rel")"
    cp "$path" "$root$rel"
    echo "$rel" >>"$root/etc/modules.load"
done

# The kernel opens /dev/console before /init runs (init then mounts devtmpfs).
if ! mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null; then
    log "warning: cannot mknod dev/console (not root?); the guest init still writes to /dev/ttyS0 after mounting devtmpfs"
fi

# Deterministic-ish archive: fixed mtimes, sorted names, root ownership.
find "$root" -exec touch -h -d @0 {} + 2>/dev/null || true
cpio_opts=(--quiet -o -H newc -R 0:0)
if cpio --help 2>/dev/null | grep -q -- '--reproducible'; then
    cpio_opts+=(--reproducible)
fi
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio "${cpio_opts[@]}") |
    gzip -9 -n >"$WORK/initrd.img"

# --- publish ----------------------------------------------------------------------------
cp "$vmlinuz" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
cat >"$OUT/manifest.txt" <<EOF
kernel_meta=$KERNEL_META $(dpkg-deb -f "$meta_deb" Version)
kernel_package=$kernel_pkg $kernel_ver
kernel_release=$kabi
busybox_package=$BUSYBOX_PKG $busybox_ver
modules=$(for p in "${load_order[@]}"; do basename "$p" .ko; done | tr '\n' ' ' | sed 's/ $//')
EOF
log "built $OUT/vmlinuz ($(stat -c %s "$OUT/vmlinuz") bytes, $kernel_pkg $kernel_ver)"
log "built $OUT/initrd.img ($(stat -c %s "$OUT/initrd.img") bytes, $BUSYBOX_PKG $busybox_ver)"
boot_image
install_outputs
