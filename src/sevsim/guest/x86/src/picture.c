/* SPDX-License-Identifier: MIT */
/*
 * picture.c - the `picture` workload: a padlock drawn into private memory.
 *
 * A 256 x 256 grayscale bitmap, one byte per pixel, row by row: 64 KiB in
 * the 16 private pages at PICTURE_GPA. Its large flat areas make any
 * structure that the memory encryption lets through visible when DRAM is
 * shown as an image (sevsim's pictures: `sevsim view`). The drawing uses
 * integers only; src/sevsim/guest/picture.py draws the same bitmap in Python
 * from the same numbers, which is how the pictures know what the guest holds.
 */
#include "guest.h"

#define BACKGROUND	235
#define SHACKLE		60
#define BODY		40
#define KEYHOLE		BACKGROUND
#define LETTERS		200

/*
 * Is the centre of pixel (x, y) inside the rectangle [x0, x1) x [y0, y1)
 * whose corners are rounded with radius r? Doubled coordinates keep the
 * pixel centre (x + 0.5) an integer: the nearest point of the rectangle
 * shrunk by r must be at most r away.
 */
static int in_rounded_box(int x, int y, int x0, int y0, int x1, int y1, int r)
{
	int px = 2 * x + 1, py = 2 * y + 1;
	int cx = px, cy = py;

	if (px < 2 * x0 || px > 2 * x1 || py < 2 * y0 || py > 2 * y1)
		return 0;
	if (cx < 2 * (x0 + r))
		cx = 2 * (x0 + r);
	if (cx > 2 * (x1 - r))
		cx = 2 * (x1 - r);
	if (cy < 2 * (y0 + r))
		cy = 2 * (y0 + r);
	if (cy > 2 * (y1 - r))
		cy = 2 * (y1 - r);
	return (px - cx) * (px - cx) + (py - cy) * (py - cy) <= 4 * r * r;
}

/* "SEV" in a 5 x 7 font, one byte per row, bit 4 the leftmost column. */
static const uint8_t glyphs[3][7] = {
	{ 0x0E, 0x11, 0x10, 0x0E, 0x01, 0x11, 0x0E },	/* S */
	{ 0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F },	/* E */
	{ 0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04 },	/* V */
};
#define TEXT_X		111	/* three letters, each 10 wide, 2 apart: centred */
#define TEXT_Y		214
#define TEXT_SCALE	2

static int in_text(int x, int y)
{
	int col = (x - TEXT_X) / TEXT_SCALE, row = (y - TEXT_Y) / TEXT_SCALE;

	if (x < TEXT_X || y < TEXT_Y || row >= 7 || col >= 3 * 6)
		return 0;
	if (col % 6 == 5)	/* the column between two letters */
		return 0;
	return glyphs[col / 6][row] >> (4 - col % 6) & 1;
}

/* The pixel at (x, y): later parts cover earlier ones, as a painter draws. */
static uint8_t padlock_pixel(int x, int y)
{
	int dx = 2 * x + 1 - 2 * 128, dy = 2 * y + 1 - 2 * 156;
	uint8_t v = BACKGROUND;

	/* The shackle: a rounded frame 22 pixels wide, most of it behind the body. */
	if (in_rounded_box(x, y, 72, 20, 185, 151, 56) &&
	    !in_rounded_box(x, y, 94, 42, 163, 129, 34))
		v = SHACKLE;
	if (x >= 40 && x <= 216 && y >= 112 && y <= 236)
		v = BODY;
	/* The keyhole: a circle of radius 16 around (128, 156) and a slot below. */
	if (dx * dx + dy * dy <= 4 * 16 * 16)
		v = KEYHOLE;
	if (x >= 122 && x <= 134 && y >= 160 && y <= 208)
		v = KEYHOLE;
	if (in_text(x, y))
		v = LETTERS;
	return v;
}

/* `picture`: draw the padlock at PICTURE_GPA, read it back, print its hash. */
void workload_picture(void)
{
	uint8_t *picture = (uint8_t *)PICTURE_GPA;
	uint8_t digest[SHA256_DIGEST_SIZE];
	char hex[2 * SHA256_DIGEST_SIZE + 1];

	for (int y = 0; y < PICTURE_SIZE; y++)
		for (int x = 0; x < PICTURE_SIZE; x++)
			picture[y * PICTURE_SIZE + x] = padlock_pixel(x, y);
	sha256(picture, PICTURE_BYTES, digest);
	hex_string(hex, digest, SHA256_DIGEST_SIZE);
	say("picture at 0x%x, %u KiB, sha256 %s", PICTURE_GPA, (unsigned)(PICTURE_BYTES >> 10), hex);
}
