/* SPDX-License-Identifier: MIT */
/*
 * count.c - the `count` workload: a guest that is busy for a long time, with
 * its state in memory, so that it can be stopped, snapshotted or migrated to
 * another machine and go on there (docs/migration.md).
 *
 * The counter lives in a private page: the host sees only its ciphertext, and
 * after a migration the receiving PSP has re-encrypted it under the new
 * guest's key. Every COUNT_HEARTBEAT increments the guest publishes "count N"
 * in a page it shares with the host and yields (HLT with interrupts on), so
 * the host gets the CPU back between two steps; every 16 heartbeats it prints
 * the count. Nothing else is needed to resume: the vCPU's registers travel
 * with the migration, and the guest goes on after its HLT.
 */
#include "guest.h"

#define COUNT_HEARTBEAT	4096		/* increments between yields */
#define COUNT_PRINT	(16 * COUNT_HEARTBEAT)	/* increments between console lines */
#define COUNT_STATUS_SIZE 32		/* "count N", NUL-padded */

/* "count N" into the shared page, through a private buffer. */
static void publish(uint64_t value)
{
	char text[COUNT_STATUS_SIZE];
	char digits[21];
	int n = sizeof(digits);

	do {
		digits[--n] = (char)('0' + value % 10);
		value /= 10;
	} while (value);
	memset(text, 0, sizeof(text));
	memcpy(text, "count ", 6);
	memcpy(text + 6, digits + n, sizeof(digits) - (size_t)n);
	memcpy((void *)COUNT_STATUS_GPA, text, sizeof(text));
}

/* Count to limit (0: forever). */
void workload_count(uint64_t limit)
{
	volatile uint64_t *counter = (volatile uint64_t *)COUNT_GPA;

	*counter = 0;
	set_page_decrypted(COUNT_STATUS_GPA, enc_cache_flush_required());
	memset((void *)COUNT_STATUS_GPA, 0, PAGE_SIZE);	/* its old contents: ciphertext */
	say("counting in private memory at 0x%x; status in shared page 0x%x",
	    COUNT_GPA, COUNT_STATUS_GPA);
	for (;;) {
		uint64_t value = *counter + 1;

		*counter = value;
		if (value % COUNT_HEARTBEAT && value != limit)
			continue;
		publish(value);
		if (value % COUNT_PRINT == 0 || value == limit)
			say("count %lu", value);
		if (value == limit)
			return;
		yield_to_host();	/* the host may stop us, snapshot us, move us */
	}
}
