/* domu-grant: runs as init's only job inside the CI domU (ci/xen/run, ci/xen/domu/init).
 *
 * Fills 4 pages with a known pattern and grants them to dom0 with gntalloc: pages 0-1
 * read-only (one ALLOC_GREF), pages 2-3 writable (another). Prints their refs and their
 * guest frame numbers (the PFN in /proc/self/pagemap; in a PVH domain that is the gfn) as
 *   XVM-DOMU-INFO ro=R0,R1 rw=R2,R3 gfns=G0,G1,G2,G3
 * then keeps the grants alive until dom0 writes the done marker at page 3 offset 4000,
 * checks that exactly dom0's expected writes arrived (ci/xen/dom0-tests/src/domu.rs makes
 * them) and prints
 *   XVM-DOMU-VERDICT PASS|FAIL <detail>
 * Static (gcc -static), no library but libc. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <xen/gntalloc.h>

#define PG 4096u
#define NPAGES 4u
#define DONE_OFF (3u * PG + 4000u)
static const char DONE[8] = {'X', 'V', 'M', 'D', 'O', 'N', 'E', '!'};

/* The pattern; the same function is in domu.rs. */
static uint8_t pat(unsigned pg, unsigned j) { return (uint8_t)(j * 7u + 13u + pg * 31u); }

/* dom0's writes into the writable pages (page, offset, 16 bytes of value); domu.rs. */
static const struct { unsigned pg, off; uint8_t val; } WRITES[] = {
    {2, 0x100, 0xC1}, /* on demand, grant copy */
    {2, 0x200, 0xC2}, /* on demand, map */
    {3, 0x300, 0xC3}, /* in advance */
    {3, 0x400, 0xC4}, /* FOREIGN */
};

static uint8_t *grant(int fa, unsigned n, int writable, uint32_t *refs)
{
    struct ioctl_gntalloc_alloc_gref *a = calloc(1, sizeof(*a) + n * sizeof(uint32_t));
    a->domid = 0;
    a->flags = writable ? GNTALLOC_FLAG_WRITABLE : 0;
    a->count = n;
    if (ioctl(fa, IOCTL_GNTALLOC_ALLOC_GREF, a)) {
        printf("XVM-DOMU-VERDICT FAIL ALLOC_GREF: %s\n", strerror(errno));
        exit(1);
    }
    uint8_t *p = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fa, a->index);
    if (p == MAP_FAILED) {
        printf("XVM-DOMU-VERDICT FAIL mmap gntalloc: %s\n", strerror(errno));
        exit(1);
    }
    memcpy(refs, a->gref_ids, n * sizeof(uint32_t));
    free(a);
    return p;
}

static uint64_t gfn(int pm, const void *va)
{
    uint64_t e = 0;
    if (pread(pm, &e, 8, ((uintptr_t)va / PG) * 8) != 8 || !(e >> 63)) return 0;
    return e & ((1ull << 55) - 1);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    int fa = open("/dev/xen/gntalloc", O_RDWR);
    if (fa < 0) {
        printf("XVM-DOMU-VERDICT FAIL open /dev/xen/gntalloc: %s\n", strerror(errno));
        return 1;
    }
    uint32_t refs[NPAGES];
    uint8_t *pg[NPAGES];
    uint8_t *ro = grant(fa, 2, 0, refs), *rw = grant(fa, 2, 1, refs + 2);
    pg[0] = ro; pg[1] = ro + PG; pg[2] = rw; pg[3] = rw + PG;
    for (unsigned i = 0; i < NPAGES; i++)
        for (unsigned j = 0; j < PG; j++) pg[i][j] = pat(i, j);
    int pm = open("/proc/self/pagemap", O_RDONLY);
    uint64_t g[NPAGES];
    for (unsigned i = 0; i < NPAGES; i++) g[i] = gfn(pm, pg[i]);
    close(pm);
    printf("XVM-DOMU-INFO ro=%u,%u rw=%u,%u gfns=%#llx,%#llx,%#llx,%#llx\n", refs[0], refs[1], refs[2], refs[3],
           (unsigned long long)g[0], (unsigned long long)g[1], (unsigned long long)g[2], (unsigned long long)g[3]);
    int waited = 0;
    while (memcmp(pg[3] + (DONE_OFF - 3 * PG), DONE, 8) != 0) {
        if (waited++ > 3000) { /* 300 s */
            printf("XVM-DOMU-VERDICT FAIL dom0 never wrote the done marker\n");
            return 1;
        }
        usleep(100000);
    }
    /* Every byte must be the pattern, except dom0's writes and the marker. */
    unsigned bad = 0, seen = 0;
    char first[160] = "";
    for (unsigned i = 0; i < NPAGES; i++)
        for (unsigned j = 0; j < PG; j++) {
            unsigned at = i * PG + j;
            uint8_t want = pat(i, j);
            if (at >= DONE_OFF && at < DONE_OFF + 8) want = (uint8_t)DONE[at - DONE_OFF];
            for (unsigned w = 0; w < sizeof(WRITES) / sizeof(WRITES[0]); w++)
                if (WRITES[w].pg == i && j >= WRITES[w].off && j < WRITES[w].off + 16) want = WRITES[w].val;
            if (pg[i][j] != want) {
                if (!bad++)
                    snprintf(first, sizeof(first), "first at page %u offset %#x: %#x, want %#x", i, j, pg[i][j], want);
            } else if (want != pat(i, j)) {
                seen++;
            }
        }
    if (bad)
        printf("XVM-DOMU-VERDICT FAIL %u byte(s) differ (%s)\n", bad, first);
    else
        printf("XVM-DOMU-VERDICT PASS the domU sees dom0's %u written bytes (grant copy, map, in advance, "
               "FOREIGN) and the marker; read-only pages and every other byte intact\n", seen);
    return bad != 0;
}
