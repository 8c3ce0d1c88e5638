/* SPDX-License-Identifier: MIT */
/*
 * rdrand.c - random numbers from the CPU's RDRAND instruction.
 */
#include "guest.h"

#define RDRAND_TRIES	100	/* per 64-bit word, as Intel's DRNG guide suggests (10 there) */

int rdrand_supported(void)
{
	uint32_t a, b, c, d;

	cpuid(1, &a, &b, &c, &d);
	return (c >> 30) & 1;		/* CPUID.01H:ECX bit 30 = RDRAND */
}

/* RDRAND sets CF=1 when it delivered a random number; CF=0 means the DRNG
 * had none ready just now, so retry a bounded number of times. */
int rdrand64(uint64_t *v)
{
	for (int i = 0; i < RDRAND_TRIES; i++) {
		uint8_t ok;
		__asm__ volatile("rdrand %0" : "=r"(*v), "=@ccc"(ok));
		if (ok)
			return 1;
	}
	return 0;
}

/* One random 64-bit word; without one (no RDRAND, or no number after the
 * retries) say so and halt, as `secret` does. */
uint64_t rdrand64_or_halt(void)
{
	uint64_t v;

	if (!rdrand_supported()) {
		say("rdrand failed (CPUID.01H:ECX.RDRAND is 0)");
		halt_forever();
	}
	if (!rdrand64(&v)) {
		say("rdrand failed");
		halt_forever();
	}
	return v;
}
