/* SPDX-License-Identifier: MIT */
/*
 * smpboot.c - starting the application processors (APs): the `aps` workload.
 *
 * Read next to Linux's arch/x86/kernel/smpboot.c (do_boot_cpu,
 * wakeup_secondary_cpu_via_init, smp_quirk_init_udelay) and OVMF's
 * UefiCpuPkg/Library/MpInitLib (SendInitSipiSipiAllExcludingSelf).
 *
 * At reset only the bootstrap processor (BSP) runs; every AP waits for a
 * STARTUP IPI. The BSP copies the real-mode trampoline (trampoline.S) to
 * TRAMPOLINE_GPA, leaves its CR3, CR4 and EFER in the mailbox at
 * AP_MAILBOX_GPA, and sends INIT, STARTUP, STARTUP to all the others through
 * its local APIC. Each AP climbs to long mode on the BSP's page tables, on
 * its own stack, and runs ap_main(): it hashes the secret the BSP keeps in
 * private memory, leaves the digest in the mailbox, and stops.
 *
 * Under SEV this is the lesson: every vCPU of a guest runs with the guest's
 * ASID, so the APs have the BSP's key. They read the private secret (and the
 * private trampoline and mailbox) in the clear; the hypervisor does not.
 *
 * Under SEV-ES an AP starts at the image's reset block instead (reset16.S),
 * which jumps to the same trampoline, and each AP has its own GHCB
 * (sev_es.c): its APIC accesses are MMIO, each one a #VC.
 */
#include "guest.h"

/* --- the local APIC --------------------------------------------------------- */

static uint32_t apic_read(uint32_t reg)
{
	return *(volatile uint32_t *)(uint64_t)(APIC_BASE + reg);
}

static void apic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)(uint64_t)(APIC_BASE + reg) = v;
}

/*
 * The APIC is MMIO, not memory: under SEV it must be mapped with the C-bit
 * clear, as OVMF's AmdSevDxe and Linux's ioremap() map MMIO. Its 2 MiB page
 * (0xFEE00000-0xFEFFFFFF) holds nothing else, so the large page is changed
 * whole. The BSP does it once; the APs share the page tables.
 */
static void apic_map_decrypted(void)
{
	volatile uint64_t *pde = (volatile uint64_t *)PD_GPA + (APIC_BASE >> 21);

	*pde &= ~BOOT_INFO->me_mask;
	invlpg(APIC_BASE);
}

/* Linux's apic_icr_write + safe_apic_wait_icr_idle: destination, then the
 * command (writing the low half sends), then wait until it is delivered. */
static void apic_icr_write(uint32_t low, uint32_t apic_id)
{
	apic_write(APIC_ICR2, apic_id << 24);
	apic_write(APIC_ICR, low);
	while (apic_read(APIC_ICR) & APIC_ICR_BUSY)
		__asm__ volatile("pause");
}

/* --- fw_cfg: how many CPUs ------------------------------------------------- */

/* QEMU's FW_CFG_NB_CPUS; 1 without fw_cfg (or an answer out of range). */
static unsigned nr_cpus(void)
{
	uint16_t n;

	if (fw_cfg_read_item(FW_CFG_NB_CPUS, &n, sizeof(n)) < 0 || n == 0)
		return 1;
	if (n > AP_MAX_CPUS) {
		say("%u CPUs: starting only the first %u", (unsigned)n, (unsigned)AP_MAX_CPUS);
		return AP_MAX_CPUS;
	}
	return n;
}

/* --- the BSP ---------------------------------------------------------------------- */

extern const uint8_t trampoline_start[], trampoline_end[];

static uint64_t read_cr4(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}

/*
 * `aps`: start every AP and have each one hash the secret (made first if no
 * `secret` ran before); print what each AP found. The BSP waits with
 * yield_to_host() (`sti; hlt`): on sevsim a HLT lets the hypervisor run the
 * other vCPUs; on QEMU or hardware the AP's wake-up IPI ends it.
 */
void workload_aps(void)
{
	volatile struct ap_mailbox *mb = AP_MAILBOX;
	unsigned cpus = nr_cpus();
	char hex[2 * SHA256_DIGEST_SIZE + 1];

	if (cpus < 2) {
		say("aps: no AP to start (1 CPU)");
		return;
	}
	secret_ensure();

	/* Where the local APIC is, and that it is on (Linux reads the same MSR,
	 * MSR_IA32_APICBASE); this firmware maps it at APIC_BASE only. */
	uint64_t apicbase = rdmsr(MSR_IA32_APICBASE);
	if ((apicbase & APICBASE_BASE_MASK) != APIC_BASE || !(apicbase & APICBASE_ENABLE)) {
		say("aps: the local APIC is not enabled at 0x%x (APIC_BASE MSR 0x%lx)",
		    APIC_BASE, apicbase);
		return;
	}

	memcpy((void *)TRAMPOLINE_GPA, trampoline_start,
	       (size_t)(trampoline_end - trampoline_start));
	memset((void *)mb, 0, sizeof(*mb));
	mb->cr3 = read_cr3();
	mb->cr4 = (uint32_t)read_cr4();
	mb->efer = rdmsr(MSR_EFER) & ~(uint64_t)EFER_LMA;	/* the CPU sets LMA itself */
	/* Under SEV-ES each AP needs its own GHCB, shared, before its first #VC. */
	mb->sev_es = (uint32_t)sev_es_active();
	if (sev_es_active())
		sev_es_prepare_ap_ghcbs(cpus);

	apic_map_decrypted();
	mb->bsp_apic_id = apic_read(APIC_ID) >> 24;
	/* Software-enable the APIC, or it takes no fixed interrupt (the wake-up). */
	apic_write(APIC_SPIV, APIC_SPIV_APIC_ENABLED | SPURIOUS_VECTOR);

	/*
	 * INIT, then two STARTUPs, to every other CPU at once (OVMF's way;
	 * Linux sends the same three to one CPU at a time). Linux waits 10 ms
	 * after INIT only on CPUs that need it and never under a hypervisor
	 * (smp_quirk_init_udelay); a second STARTUP reaches only an AP that
	 * missed the first and is ignored by one that has left its wait state.
	 */
	apic_icr_write(APIC_DEST_ALLBUT | APIC_INT_LEVELTRIG | APIC_INT_ASSERT | APIC_DM_INIT, 0);
	for (int i = 0; i < 2; i++)
		apic_icr_write(APIC_DEST_ALLBUT | APIC_DM_STARTUP | SIPI_VECTOR, 0);

	while (__atomic_load_n(&mb->online, __ATOMIC_ACQUIRE) < cpus - 1)
		yield_to_host();

	for (unsigned cpu = 0; cpu < cpus; cpu++) {
		if (cpu == mb->bsp_apic_id)
			continue;
		hex_string(hex, (const uint8_t *)mb->digest[cpu], SHA256_DIGEST_SIZE);
		say("cpu %u read the secret, sha256 %s", cpu, hex);
	}
	say("aps: %u CPUs online", cpus);
}

/* --- an AP ------------------------------------------------------------------------ */

/*
 * Where each AP arrives from trampoline.S, in long mode on its own stack:
 * hash the secret as this CPU reads it, report, wake the BSP, stop.
 */
noreturn void ap_main(uint32_t apic_id)
{
	volatile struct ap_mailbox *mb = AP_MAILBOX;
	uint8_t digest[SHA256_DIGEST_SIZE];

	if (mb->sev_es)
		sev_es_ap_setup_ghcb(apic_id);	/* before the APIC's MMIO raises #VC */
	sha256((const void *)(SECRET_GPA + sizeof(SECRET_MARKER) - 1), SECRET_BYTES, digest);
	memcpy((void *)mb->digest[apic_id], digest, sizeof(digest));
	__atomic_add_fetch(&mb->online, 1, __ATOMIC_RELEASE);	/* LOCK ADD */
	apic_icr_write(APIC_DM_FIXED | WAKEUP_VECTOR, mb->bsp_apic_id);
	halt_forever();
}
