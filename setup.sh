#!/usr/bin/env bash
# Set up foliovm on a fresh Debian 12 machine (as root) and boot a Linux guest.
#
#   ./setup.sh            install packages, build guest images and foliovm, boot the guest
#   ./setup.sh --no-boot  everything but the boot (CI uses this before the tests)
#
# The guest kernel build takes about 4 minutes on 2 cores and is cached; the
# boot takes minutes on a software KVM (kvm-pvm) and well under a second on
# real KVM hardware.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

boot=1
case "${1:-}" in
--no-boot) boot=0 ;;
"") ;;
*) echo "usage: $0 [--no-boot]" >&2; exit 2 ;;
esac

# e2fsprogs: mkfs.ext4 for the root-drive test. (No crate here uses bindgen,
# so libclang-dev is not needed: mem issues its userfaultfd ioctls itself.)
# The guest-image packages are installed by guest-images/build.sh itself.
export DEBIAN_FRONTEND=noninteractive
need=()
for p in build-essential pkg-config e2fsprogs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
	apt-get update -qq
	apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo not found: install Rust (rustup) first" >&2; exit 1; }
# The workspace's rust-version (Cargo.toml); Debian's own cargo is older.
min=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
have=$(rustc --version | cut -d' ' -f2)
if [ "$(printf '%s\n%s\n' "$min" "$have" | sort -V | head -n1)" != "$min" ]; then
	echo "setup.sh: Rust $have is too old: foliovm needs $min or newer (rustup update)" >&2
	exit 1
fi

guest-images/build.sh
cargo build --release --workspace

if ((boot)); then
	echo "setup.sh: booting the Linux guest (minutes on a software KVM)..." >&2
	exec ./target/release/foliovm run \
		--kernel guest-images/out/vmlinux \
		--initrd guest-images/out/initramfs.cpio \
		--mem 256M --vcpus 1 \
		--cmdline "console=ttyS0 reboot=k panic=1 pci=off -- uname -a"
fi
