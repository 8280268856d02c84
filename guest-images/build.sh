#!/usr/bin/env bash
# Build the foliovm Linux guest: a tinyconfig-based 6.1 kernel from Debian's
# linux-source-6.1 (plus three software-KVM patches) and a busybox-static
# initramfs. Outputs are cached under
#   ${FOLIOVM_CACHE:-/var/cache/foliovm}/guest-images/<hash>/
# and linked into guest-images/out/. See guest-images/README.md.
#
# Usage: guest-images/build.sh [--force] [--print-hash] [--help]
#   --print-hash  print the input hash and exit (nothing is built)
#   --force       rebuild even if the cache holds this hash
#
# Runs as root (it installs Debian packages with apt-get if missing).

set -euo pipefail

readonly HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
readonly FRAGMENT="$HERE/kernel/microvm.config"
readonly PATCH_DIR="$HERE/kernel/patches"
readonly INIT="$HERE/initramfs/init"
readonly OUT_LINKS="$HERE/out"
readonly CACHE_ROOT="${FOLIOVM_CACHE:-/var/cache/foliovm}/guest-images"

# Packages the build needs. linux-source-6.1's version is resolved at run
# time (the mirror moves); so is busybox-static's. Both go into the hash.
readonly KERNEL_PKG=linux-source-6.1
readonly BUSYBOX_PKG=busybox-static
readonly PACKAGES=(
	"$KERNEL_PKG" "$BUSYBOX_PKG"
	build-essential bc bison flex libelf-dev
	cpio gzip xz-utils lz4 file
)
# Files a complete cache entry holds.
readonly OUTPUTS=(vmlinux bzImage initramfs.cpio.gz initramfs.cpio kernel.config System.map)

# Fixed build identity, so that `uname -a` does not change between rebuilds.
export KBUILD_BUILD_USER=foliovm KBUILD_BUILD_HOST=foliovm
export KBUILD_BUILD_TIMESTAMP="2024-01-01 00:00:00 UTC"
readonly CPIO_MTIME=1704067200 # the same instant, for the initramfs entries

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,13s/^# \{0,1\}//p' "$SELF"; }

force=0
print_hash=0
while [[ $# -gt 0 ]]; do
	case "$1" in
	--force) force=1 ;;
	--print-hash) print_hash=1 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
	shift
done

[[ -f "$FRAGMENT" ]] || die "missing kernel config fragment $FRAGMENT"
[[ -f "$INIT" ]] || die "missing init script $INIT"
shopt -s nullglob
PATCHES=("$PATCH_DIR"/*.patch)
shopt -u nullglob
[[ ${#PATCHES[@]} -gt 0 ]] || die "no patches found in $PATCH_DIR"

# --- packages ----------------------------------------------------------------

installed_version() { # pkg -> version, or nothing if not installed
	dpkg-query -W -f='${Status}\t${Version}\n' "$1" 2>/dev/null |
		awk -F'\t' '$1 == "install ok installed" { print $2 }'
}

candidate_version() { # pkg -> version apt-get would install
	apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }'
}

# The version a build would use: the installed one, else what apt would install.
resolve_version() {
	local v
	v="$(installed_version "$1")"
	[[ -n "$v" ]] || v="$(candidate_version "$1")"
	[[ -n "$v" && "$v" != "(none)" ]] ||
		die "cannot resolve a version of Debian package $1 (try: apt-get update)"
	printf '%s\n' "$v"
}

ensure_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		[[ -n "$(installed_version "$p")" ]] || missing+=("$p")
	done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	[[ $EUID -eq 0 ]] || die "need root to install: ${missing[*]}"
	log "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
		log "apt-get install failed; running apt-get update and retrying"
		apt-get update
		apt-get install -y --no-install-recommends "${missing[@]}" ||
			die "apt-get could not install: ${missing[*]}"
	fi
}

# --- hash -------------------------------------------------------------------

compute_hash() {
	local kver bver
	kver="$(resolve_version "$KERNEL_PKG")"
	bver="$(resolve_version "$BUSYBOX_PKG")"
	{
		printf 'format 1\n'
		printf '%s %s\n' "$KERNEL_PKG" "$kver" "$BUSYBOX_PKG" "$bver"
		# Contents only (names relative to guest-images/), so the hash does
		# not depend on where the repository is checked out.
		local f
		for f in "$SELF" "$FRAGMENT" "$INIT" "${PATCHES[@]}"; do
			printf 'file %s %s\n' "${f#"$HERE"/}" "$(sha256sum <"$f" | cut -d' ' -f1)"
		done
	} | sha256sum | cut -c1-16
}

if [[ $print_hash -eq 1 ]]; then
	compute_hash
	exit 0
fi

ensure_packages
HASH="$(compute_hash)"
readonly HASH
readonly DEST="$CACHE_ROOT/$HASH"

cache_complete() {
	local o
	for o in "${OUTPUTS[@]}"; do
		[[ -s "$DEST/$o" ]] || return 1
	done
}

link_outputs() {
	mkdir -p "$OUT_LINKS"
	local o
	for o in "${OUTPUTS[@]}"; do
		ln -sfn "$DEST/$o" "$OUT_LINKS/$o"
	done
	printf '%s\n' "$HASH" >"$OUT_LINKS/HASH"
	log "outputs (hash $HASH, cache $DEST):"
	for o in vmlinux bzImage initramfs.cpio.gz kernel.config; do
		printf '%s\n' "$OUT_LINKS/$o"
	done
}

# One build at a time per cache (two engineers, two cores).
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
	log "another build holds $CACHE_ROOT/.lock; waiting"
	flock 9
fi

if [[ $force -eq 0 ]] && cache_complete; then
	log "cache hit"
	link_outputs
	exit 0
fi

# --- build ------------------------------------------------------------------

readonly WORK="$CACHE_ROOT/$HASH.build"
readonly STAGE="$WORK/outputs"
rm -rf "$WORK"
mkdir -p "$STAGE"
start=$SECONDS

# Kernel source: the tarball shipped by the installed linux-source-6.1.
tarball="$(dpkg-query -L "$KERNEL_PKG" | grep -E '^/usr/src/linux-source-6\.1\.tar\.(xz|bz2|gz)$' | head -n1 || true)"
[[ -n "$tarball" && -f "$tarball" ]] ||
	die "$KERNEL_PKG is installed but its /usr/src/linux-source-6.1.tar.* is missing"
log "extracting $tarball ($KERNEL_PKG $(installed_version "$KERNEL_PKG"))"
tar -C "$WORK" -xf "$tarball"
SRC="$WORK/linux-source-6.1"
[[ -f "$SRC/Makefile" ]] || die "unexpected layout in $tarball (no linux-source-6.1/Makefile)"

for p in "${PATCHES[@]}"; do
	log "applying $(basename "$p")"
	patch -d "$SRC" -p1 --forward --batch --no-backup-if-mismatch -i "$p" ||
		die "patch $(basename "$p") does not apply to $KERNEL_PKG $(installed_version "$KERNEL_PKG")"
done
# A hunk that went in with fuzz leaves *.rej/*.orig only on failure, which
# patch reports above; still, make sure nothing was left half-applied.
if find "$SRC/arch" -name '*.rej' | grep -q .; then
	die "rejected hunks left in $SRC"
fi

KMAKE=(make -C "$SRC" ARCH=x86_64)
log "configuring: tinyconfig + $(basename "$FRAGMENT")"
{
	"${KMAKE[@]}" tinyconfig &&
		(cd "$SRC" && ./scripts/kconfig/merge_config.sh -m .config "$FRAGMENT") &&
		"${KMAKE[@]}" olddefconfig
} >"$WORK/config.log" 2>&1 || {
	tail -n 20 "$WORK/config.log" >&2
	die "kernel configuration failed, full log in $WORK/config.log"
}

# Dependencies can silently drop a symbol: check every line of the fragment.
bad=()
while IFS= read -r line; do
	if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		sym="${BASH_REMATCH[1]}" want="${BASH_REMATCH[2]}"
		grep -qxF "$sym=$want" "$SRC/.config" ||
			bad+=("$sym: wanted $want, got '$(grep -E "^(# )?$sym[= ]" "$SRC/.config" || echo absent)'")
	elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		sym="${BASH_REMATCH[1]}"
		if grep -qE "^$sym=" "$SRC/.config"; then
			bad+=("$sym: wanted off, got '$(grep -E "^$sym=" "$SRC/.config")'")
		fi
	fi
done <"$FRAGMENT"
if [[ ${#bad[@]} -gt 0 ]]; then
	printf '  %s\n' "${bad[@]}" >&2
	die "${#bad[@]} symbol(s) of $(basename "$FRAGMENT") did not survive olddefconfig (see above)"
fi
log "config verified: every symbol of $(basename "$FRAGMENT") is as requested"

log "building vmlinux + bzImage with -j$(nproc) (about 3.5 min on 2 cores)"
"${KMAKE[@]}" -j"$(nproc)" vmlinux bzImage >"$WORK/kbuild.log" 2>&1 || {
	tail -n 40 "$WORK/kbuild.log" >&2
	die "kernel build failed, full log in $WORK/kbuild.log"
}
cp "$SRC/vmlinux" "$STAGE/vmlinux"
cp "$SRC/arch/x86/boot/bzImage" "$STAGE/bzImage"
cp "$SRC/.config" "$STAGE/kernel.config"
cp "$SRC/System.map" "$STAGE/System.map"

# Initramfs: described as a gen_init_cpio list (the kernel's own tool, built
# above as part of vmlinux), so device nodes need no mknod and every entry
# gets the same mtime: the archive is reproducible.
log "building initramfs (busybox-static $(installed_version "$BUSYBOX_PKG"))"
busybox=/bin/busybox
[[ -x "$busybox" ]] && file -L "$busybox" | grep -q 'statically linked' ||
	die "$busybox is missing or not static; is $BUSYBOX_PKG installed?"
GEN_CPIO="$SRC/usr/gen_init_cpio"
[[ -x "$GEN_CPIO" ]] || "${KMAKE[@]}" -s usr/gen_init_cpio
[[ -x "$GEN_CPIO" ]] || die "could not build usr/gen_init_cpio"
list="$WORK/initramfs.list"
{
	for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /tmp /root /etc /mnt; do
		printf 'dir %s 0755 0 0\n' "$d"
	done
	printf 'nod /dev/console 0600 0 0 c 5 1\n'
	printf 'nod /dev/null 0666 0 0 c 1 3\n'
	printf 'file /bin/busybox %s 0755 0 0\n' "$busybox"
	printf 'file /init %s 0755 0 0\n' "$INIT"
	# One symlink per applet, at the path busybox itself lists.
	"$busybox" --list-full | sort -u | while IFS= read -r applet; do
		[[ "$applet" == bin/busybox ]] && continue
		printf 'slink /%s /bin/busybox 0777 0 0\n' "$applet"
	done
} >"$list"
grep -q '^slink /bin/sh ' "$list" || die "busybox has no sh applet"
grep -q '^slink /sbin/reboot ' "$list" || die "busybox has no reboot applet"
"$GEN_CPIO" -t "$CPIO_MTIME" "$list" >"$STAGE/initramfs.cpio"
gzip -9 -n -c "$STAGE/initramfs.cpio" >"$STAGE/initramfs.cpio.gz"

# Publish atomically: the cache dir either has all outputs or does not exist.
rm -rf "$DEST"
mv "$STAGE" "$DEST"
cache_complete || die "internal error: $DEST is incomplete after the build"
rm -rf "$WORK"
log "built in $((SECONDS - start)) s"
link_outputs
