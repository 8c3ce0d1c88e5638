/* SPDX-License-Identifier: MIT */
/*
 * serial.c - the console: a 16550/8250 UART at COM1 (I/O port 0x3F8), polled.
 *
 * Read next to Linux's arch/x86/boot/early_serial_console.c and tty.c.
 * Port I/O is not memory, so it is never encrypted: under SEV (without -ES)
 * the hypervisor intercepts IN/OUT and sees the bytes in the clear. Never
 * print secrets.
 */
#include "guest.h"

#define COM1	0x3F8
#define THR	0	/* transmit holding register (DLAB=0) */
#define IER	1	/* interrupt enable (DLAB=0) */
#define DLL	0	/* divisor latch low (DLAB=1) */
#define DLH	1	/* divisor latch high (DLAB=1) */
#define FCR	2	/* FIFO control */
#define LCR	3	/* line control */
#define MCR	4	/* modem control */
#define LSR	5	/* line status */
#define LSR_THRE 0x20	/* bit 5: transmit holding register empty */

/* 115200 baud, 8 data bits, no parity, 1 stop bit, no interrupts: as
 * early_serial_init() sets it up. */
void serial_init(void)
{
	outb(COM1 + LCR, 0x03);		/* 8n1, DLAB=0 */
	outb(COM1 + IER, 0x00);		/* no interrupts: we poll */
	outb(COM1 + FCR, 0x00);		/* no FIFO */
	outb(COM1 + MCR, 0x03);		/* DTR + RTS */
	outb(COM1 + LCR, 0x83);		/* DLAB=1 to reach the divisor */
	outb(COM1 + DLL, 1);		/* 115200 / 1 */
	outb(COM1 + DLH, 0);
	outb(COM1 + LCR, 0x03);		/* DLAB=0 again */
}

void serial_putc(char c)
{
	/* Wait until the UART can take a byte. Like Linux, give up after a while
	 * rather than hang if nothing answers at this port. */
	for (unsigned int timeout = 0xffff; timeout; timeout--)
		if (inb(COM1 + LSR) & LSR_THRE)
			break;
	outb(COM1 + THR, (uint8_t)c);
}

static void puts_raw(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

static void put_unsigned(uint64_t v, unsigned int base)
{
	char buf[21];			/* 2^64 - 1 has 20 decimal digits */
	int i = sizeof(buf);

	buf[--i] = '\0';
	do {
		buf[--i] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	puts_raw(&buf[i]);
}

static void vprint(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		int is_long = 0;
		fmt++;
		if (*fmt == 'l') {
			is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's':
			puts_raw(va_arg(ap, const char *));
			break;
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case 'u':
		case 'x':
			put_unsigned(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int),
				     *fmt == 'u' ? 10 : 16);
			break;
		case '%':
			serial_putc('%');
			break;
		default:		/* not supported: show it as it is */
			serial_putc('%');
			serial_putc(*fmt);
			break;
		}
		if (!*fmt)
			break;
	}
}

void say(const char *fmt, ...)
{
	va_list ap;

	puts_raw("sevsim-guest: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	serial_putc('\n');
}

void hex_string(char *out, const uint8_t *data, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		out[2 * i] = "0123456789abcdef"[data[i] >> 4];
		out[2 * i + 1] = "0123456789abcdef"[data[i] & 15];
	}
	out[2 * len] = '\0';
}
