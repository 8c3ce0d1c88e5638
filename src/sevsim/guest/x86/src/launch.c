/* SPDX-License-Identifier: MIT */
/*
 * launch.c - the SEV launch, seen from inside: what OVMF's AmdSev build does
 * for a measured direct boot, and the proof that the owner's secret arrived.
 *
 * Read next to OVMF's OvmfPkg/AmdSev/BlobVerifierLibSevHashes
 * (BlobVerifierLibSevHashes.c), OvmfPkg/AmdSev/SecretDxe and QEMU's
 * target/i386/sev.c (sev_add_kernel_loader_hashes).
 *
 * Measured direct boot: with -kernel, QEMU writes a table of SHA-256 hashes
 * of the kernel, initrd and command line into the hashes area the footer
 * table names, and has the PSP measure it with the firmware. The guest owner
 * checks that measurement before it sends any secret. The firmware then
 * loads the three blobs through fw_cfg, which the hypervisor controls, so it
 * must hash what it loaded and compare with the measured table: a swapped
 * kernel is refused, and nothing runs.
 */
#include "guest.h"

/* The footer-table entry of the hashes area (7255371f-...) */
static const guid_t sev_hash_table_rv_guid =
	GUID_INIT(0x7255371f, 0x3a3b, 0x4b04, 0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54);
/* QEMU's SEV hashes table and its entries (target/i386/sev.c) */
static const guid_t sev_hash_table_guid =
	GUID_INIT(0x9438d606, 0x4f22, 0x4cc9, 0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21);
static const guid_t sev_cmdline_entry_guid =
	GUID_INIT(0x97d02dd8, 0xbd20, 0x4c94, 0xaa, 0x78, 0xe7, 0x71, 0x4d, 0x36, 0xab, 0x2a);
static const guid_t sev_initrd_entry_guid =
	GUID_INIT(0x44baf731, 0x3a2f, 0x4bd7, 0x9a, 0xf1, 0x41, 0xe2, 0x91, 0x69, 0x78, 0x1d);
static const guid_t sev_kernel_entry_guid =
	GUID_INIT(0x4de79437, 0xabd2, 0x427f, 0xb8, 0x35, 0xd5, 0xb1, 0x72, 0xd2, 0x04, 0x5b);

#define HASH_TABLE_LEN_SIZE	2	/* QEMU's table has u16 lengths */
#define READY_MESSAGE		"sevsim guest ready"

/* The measured hash of one blob, from the hashes area; NULL if absent. */
static const uint8_t *measured_hash(const guid_t *entry_guid)
{
	uint32_t base, size, len;
	const uint8_t *guid, *data;

	if (!ovmf_area(&sev_hash_table_rv_guid, &base, &size))
		return NULL;
	for (int i = 0; guid_table_entry((const uint8_t *)(uintptr_t)base, size,
					 &sev_hash_table_guid, HASH_TABLE_LEN_SIZE, i,
					 &guid, &data, &len); i++)
		if (guid_equal(entry_guid, guid) && len == SHA256_DIGEST_SIZE)
			return data;
	return NULL;
}

/*
 * Load a blob from fw_cfg a page at a time into private memory (the stack)
 * and hash it there: what is hashed is what was copied, whatever the
 * hypervisor writes into the shared buffer afterwards. The first keep_size
 * bytes are also kept at keep. An empty command line is hashed as its NUL,
 * as QEMU measures it.
 */
static int hash_blob(uint16_t size_key, uint16_t data_key, uint8_t digest[SHA256_DIGEST_SIZE],
		     char *keep, uint32_t keep_size)
{
	uint8_t chunk[PAGE_SIZE];
	uint32_t size = (uint32_t)fw_cfg_read_int(size_key, 4);
	struct sha256_ctx ctx;

	sha256_init(&ctx);
	if (size == 0 && size_key == FW_CFG_CMDLINE_SIZE)
		sha256_update(&ctx, "", 1);
	fw_cfg_select(data_key);
	for (uint32_t done = 0; done < size;) {
		uint32_t n = size - done < sizeof(chunk) ? size - done : sizeof(chunk);

		if (fw_cfg_read(chunk, n) < 0)
			return -1;
		if (keep && done < keep_size)
			memcpy(keep + done, chunk, n < keep_size - done ? n : keep_size - done);
		sha256_update(&ctx, chunk, n);
		done += n;
	}
	sha256_final(&ctx, digest);
	return 0;
}

/* "ok" if the blob's hash is the measured one, else "MISMATCH". */
static const char *check_blob(uint16_t size_key, uint16_t data_key, const guid_t *entry_guid,
			      char *keep, uint32_t keep_size, int *ok)
{
	const uint8_t *measured = measured_hash(entry_guid);
	uint8_t digest[SHA256_DIGEST_SIZE];

	if (!measured || hash_blob(size_key, data_key, digest, keep, keep_size) < 0 ||
	    memcmp(digest, measured, SHA256_DIGEST_SIZE) != 0) {
		*ok = 0;
		return "MISMATCH";
	}
	return "ok";
}

/*
 * Check the kernel, initrd and command line the VMM passes against the
 * measured hashes table (OVMF's VerifyBlob()). Returns 1 if they match, or if
 * there is no kernel; 0 if the kernel must not boot. The verified command line
 * is kept, NUL-terminated, at CMDLINE_GPA (kernel_cmdline()).
 */
static int verify_kernel_hashes(void)
{
	char *cmdline = (char *)CMDLINE_GPA;
	int ok = 1;

	memset(cmdline, 0, CMDLINE_MAX);
	if (fw_cfg_read_int(FW_CFG_KERNEL_SIZE, 4) == 0)
		return 1;
	if (!measured_hash(&sev_kernel_entry_guid)) {
		say("a kernel was passed but no measured hashes table exists: refusing it");
		return 0;
	}
	const char *c = check_blob(FW_CFG_CMDLINE_SIZE, FW_CFG_CMDLINE_DATA,
				   &sev_cmdline_entry_guid, cmdline, CMDLINE_MAX - 1, &ok);
	const char *i = check_blob(FW_CFG_INITRD_SIZE, FW_CFG_INITRD_DATA,
				   &sev_initrd_entry_guid, NULL, 0, &ok);
	const char *k = check_blob(FW_CFG_KERNEL_SIZE, FW_CFG_KERNEL_DATA,
				   &sev_kernel_entry_guid, NULL, 0, &ok);
	say("kernel hashes: cmdline %s, initrd %s, kernel %s%s", c, i, k,
	    ok ? "" : "; refusing to boot this kernel");
	if (!ok)
		memset(cmdline, 0, CMDLINE_MAX);
	return ok;
}

/*
 * Prove that the owner's secrets arrived, without showing them: for each one
 * its GUID, its length, the start of its SHA-256 and HMAC-SHA256(secret,
 * "sevsim guest ready"), which the owner recomputes. The secret itself stays
 * in private memory.
 */
static void prove_launch_secrets(void)
{
	const uint8_t *guid, *data;
	uint32_t size, len;
	uint8_t digest[SHA256_DIGEST_SIZE], mac[SHA256_DIGEST_SIZE];
	char guid_text[37], digest_hex[17], mac_hex[2 * SHA256_DIGEST_SIZE + 1];

	if (!sev_secret_area(&size)) {
		say("no secret area in this firmware");
		return;
	}
	if (!sev_secret_next(0, &guid, &data, &len)) {
		say("no secret was injected");
		return;
	}
	for (int i = 0; sev_secret_next(i, &guid, &data, &len); i++) {
		sha256(data, len, digest);
		hmac_sha256(data, len, READY_MESSAGE, sizeof(READY_MESSAGE) - 1, mac);
		guid_string(guid_text, guid);
		hex_string(digest_hex, digest, 8);
		hex_string(mac_hex, mac, SHA256_DIGEST_SIZE);
		say("secret %s: %u bytes, sha256 %s..., HMAC(secret, '%s') = %s",
		    guid_text, len, digest_hex, READY_MESSAGE, mac_hex);
	}
}

/*
 * The launch checks, before any workload: under SEV, or when the VMM passes a
 * kernel. Returns 0 if the kernel was refused: then no workload may run.
 */
int launch_checks(void)
{
	int kernel = fw_cfg_read_int(FW_CFG_KERNEL_SIZE, 4) != 0;

	if (!sev_active() && !kernel)
		return 1;		/* a plain VM that was given nothing to check */
	int booted = verify_kernel_hashes();
	if (sev_active())
		prove_launch_secrets();
	say(booted ? "firmware done" : "firmware done; the kernel was NOT booted");
	return booted;
}

/* The verified kernel command line ("" if none, or if it was refused). */
const char *kernel_cmdline(void)
{
	return (const char *)CMDLINE_GPA;
}
