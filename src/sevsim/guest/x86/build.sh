#!/usr/bin/env bash
# build.sh - build the sevsim guest firmware: a 64 KiB flat image ending at
# 4 GiB (sevsim-guest.fd) and its symbol file (sevsim-guest.sym.json).
#
#   build.sh           rebuild both files next to this script
#   build.sh --check   rebuild in a temporary directory; exit 1 if the result
#                      differs from the files next to this script
#
# The build is byte-reproducible: fixed flags, sorted inputs, no debug info,
# no build id, no timestamps, no absolute paths. It is pinned to the toolchain
# of Debian 12 (gcc 12.2, binutils 2.40); another version may emit other bytes.
set -euo pipefail
export LC_ALL=C TZ=UTC

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$here/src
mode=build
case "${1:-}" in
"") ;;
--check) mode=check ;;
*) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

GCC_VERSION=12.2.0
BINUTILS_VERSION=2.40
IMAGE_SIZE=65536
IMAGE=sevsim-guest.fd
SYMS=sevsim-guest.sym.json
# The symbols written to $SYMS (code in the image, and fixed RAM addresses).
EXPORTS=(
	reset_vector real_start gdt gdt_desc entry32 entry64
	exception_stubs exception_common exception_handler main
	alu_loop mem_loop load_loop probe_read8 probe_rdmsr yield_to_host idt ovmf_table
	trampoline_start ap_main wakeup_interrupt
	IMAGE_BASE BOOT_INFO_GPA PML4_GPA PDPT_GPA PD_GPA SPLIT_PT_GPA IDT_GPA
	STACK_TOP SECRET_GPA SHARED_GPA ALIAS_GPA ALIAS_FLUSH_GPA SELFMOD_GPA LOADS_GPA MEM_LOOP_GPA
	BALANCE_GPA FLAGS_GPA INBOX_BUFFER_GPA SETTING_GPA INBOX_SHARED_GPA
	TRAMPOLINE_GPA AP_STACKS_GPA AP_MAILBOX_GPA PICTURE_GPA
	SEV_LAUNCH_SECRET_GPA QEMU_HASH_TABLE_GPA FW_CFG_DMA_GPA COUNT_GPA COUNT_STATUS_GPA CMDLINE_GPA
	PT_POOL_GPA VIRTQ_GPA DISK_BUFFER_GPA DISK_EXPECT_GPA DISK_TAGS_GPA IO_AREA_END
	swiotlb_init swiotlb_map swiotlb_unmap virtblk_probe set_memory_decrypted
	set_memory_encrypted workload_disk
	GHCB_GPA VC_COUNTS_GPA vc_handler sev_es_ap_reset
)

for tool in gcc ld objcopy nm; do
	command -v "$tool" >/dev/null || { echo "build.sh: $tool not found" >&2; exit 2; }
done
have_gcc=$(gcc -dumpfullversion)
have_binutils=$(ld --version | sed -n '1s/.* \([0-9][0-9.]*\)$/\1/p')
if [ "$have_gcc" != "$GCC_VERSION" ] || [ "$have_binutils" != "$BINUTILS_VERSION" ]; then
	echo "build.sh: warning: gcc $have_gcc / binutils $have_binutils;" \
		"the shipped image was built with gcc $GCC_VERSION / binutils $BINUTILS_VERSION" >&2
fi

# Freestanding 64-bit code, position-independent so that it runs at 0xFFFFxxxx
# (see src/guest.h), no SSE/x87 (-mgeneral-regs-only), no red zone (exceptions
# push onto the same stack), nothing the compiler would need a runtime for.
CFLAGS=(
	-std=gnu11 -O2 -m64 -march=x86-64 -mtune=generic
	-ffreestanding -nostdinc -isystem "$(gcc -print-file-name=include)"
	-fpie -mcmodel=small -mno-red-zone -mgeneral-regs-only
	-fno-stack-protector -fcf-protection=none -fno-plt -fno-common
	-fno-asynchronous-unwind-tables -fno-unwind-tables
	-fno-tree-loop-distribute-patterns -fno-strict-aliasing
	-fno-ident -ffile-prefix-map="$src"=.
	-Wall -Wextra -Werror
)
ASFLAGS=(-m64 -x assembler-with-cpp -ffile-prefix-map="$src"=. -Wa,--fatal-warnings)
LDFLAGS=(-m elf_x86_64 -T linker.ld -nostdlib -static --build-id=none -z noexecstack)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$src"

mapfile -t sources < <(ls -1 -- *.S *.c | sort)
objects=()
for f in "${sources[@]}"; do
	o=$work/${f%.*}.o
	case "$f" in
	*.S) gcc "${ASFLAGS[@]}" -c "$f" -o "$o" ;;
	*.c) gcc "${CFLAGS[@]}" -c "$f" -o "$o" ;;
	esac
	objects+=("$o")
done

ld "${LDFLAGS[@]}" -o "$work/sevsim-guest.elf" "${objects[@]}"
# Gaps between sections read 0xFF, like erased flash.
objcopy -O binary --gap-fill=0xff "$work/sevsim-guest.elf" "$work/$IMAGE"

size=$(stat -c %s "$work/$IMAGE")
if [ "$size" != "$IMAGE_SIZE" ]; then
	echo "build.sh: $IMAGE is $size bytes, not $IMAGE_SIZE" >&2
	exit 1
fi

# {name: address} for the exported symbols, sorted by name, as JSON.
nm -P "$work/sevsim-guest.elf" >"$work/nm.txt"
{
	echo "{"
	for name in "${EXPORTS[@]}"; do
		addr=$(awk -v n="$name" '$1 == n { print $3; exit }' "$work/nm.txt")
		if [ -z "$addr" ]; then
			echo "build.sh: symbol $name not found" >&2
			exit 1
		fi
		printf '  "%s": %d\n' "$name" "$((16#$addr))"
	done | sort | sed '$!s/$/,/'
	echo "}"
} >"$work/$SYMS"

if [ "$mode" = build ]; then
	cp "$work/$IMAGE" "$work/$SYMS" "$here/"
	echo "build.sh: wrote $IMAGE ($size bytes) and $SYMS"
else
	for f in "$IMAGE" "$SYMS"; do
		if ! cmp -s "$work/$f" "$here/$f"; then
			echo "build.sh --check: $f differs from a fresh build (run build.sh and commit the result)"
			exit 1
		fi
	done
	echo "build.sh --check: $IMAGE and $SYMS match a fresh build"
fi
