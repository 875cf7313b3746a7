/* domu-vq: a virtio-blk driver in the CI domU, served by a vhost-user daemon in dom0.
 *
 * One split virtqueue (QSIZE entries) in 2 pages granted writable to dom0: the descriptor
 * table at page offset 0x840, the avail ring right after it, the used ring after that (4-byte
 * aligned), as Linux lays a vring out in one DMA allocation (here mid-page). Buffers are
 * granted the way Linux's grant DMA does it: one ALLOC_GREF per buffer, consecutive refs,
 * read-only for what the device reads (request header, write data), writable for what it
 * writes (read data, status byte); descriptor addresses are grant addresses
 * `1<<63 | ref<<12 | offset`. Features: VERSION_1 only (no EVENT_IDX, no indirect).
 *
 * Notifications: interdomain event channels through /dev/xen/evtchn. The domU binds an
 * unbound port for dom0 and prints it; dom0's frontend (ci/xen/dom0-tests/src/bin/xen-vq.rs)
 * binds to it, forwards each event to the daemon's kick eventfd and each call of the daemon
 * back as an event. The domU notifies after each batch it publishes and sleeps in read() on
 * the event channel when it has nothing to reap.
 *
 * It prints its layout as one line
 *   XVM-DOMU-VQ mode=xen port=P qsize=Q desc=0x.. avail=0x.. used=0x.. ring_refs=A-B
 *       bufs=N data=BYTES slots=S blocks=K
 * waits for dom0's first event, then for each queue depth: writes every block with a pattern
 * (checks status, used length, and that the read-only header and data are untouched), reads
 * every block back into zeroed writable buffers and checks every byte; prints
 *   XVM-DOMU-VQ-RESULT depth=D PASS|FAIL <detail> rps=R
 * then the fault cases (a descriptor at a ref it never granted: that request fails, the
 * others of its batch complete; a data grant revoked while its request is published and not
 * yet notified: the same, then a checked pass; the frontend disconnecting mid-batch), and finally
 *   XVM-DOMU-VQ-VERDICT PASS|FAIL <detail>
 *
 * `--host DIR` runs the same driver on a machine without Xen, for tests: memory is a memfd
 * (gpa = offset in it, one UNIX region), the doorbells are the FIFOs DIR/kick and DIR/call,
 * and the layout line says mode=host pid=.. memfd=.. size=.. dir=DIR.
 * Other options: --depths 1,8,32  --blocks K  --data BYTES  --no-fault.
 * Static (gcc -static), no library but libc. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>

#define PG 4096u
#define QSIZE 128u
#define MAX_SLOTS 32u
#define RING_OFF 0x840u
#define HDR_OFF 0x100u   /* the header's offset in its page */
#define STATUS_OFF 0x7ffu /* the status byte's offset in its page */
#define GRANT_BIT (1ull << 63)
#define F_NEXT 1
#define F_WRITE 2
#define T_IN 0
#define T_OUT 1
#define WAIT_MS 30000

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
/* gpa: grant address (host mode: memfd offset); fgpa: guest-physical address of the first
 * page (gfn << 12; the pages' gfns need not be contiguous, so only the first page is used at
 * it: the benchmark's 4 KiB requests). */
struct buf { uint8_t *p; uint64_t gpa, fgpa, index; unsigned pages; uint32_t ref0; };
struct slot { struct buf hdr, wdata, rdata, status; int busy; unsigned req; };

static int host;           /* --host: memfd and FIFOs instead of gntalloc and evtchn */
static int fa = -1;        /* gntalloc */
/* A doorbell pair with dom0: an interdomain event channel (fd = /dev/xen/evtchn, port), or in
 * host mode two FIFOs (tx written here, rx read here). */
struct bell { int fd; unsigned port; int tx, rx; };
static struct bell data_bell, ctl_bell; /* completions and kicks; queue resets */
static int memfd = -1;
static uint8_t *hmem;      /* host mode: the memfd's mapping */
static size_t hsize = 16u << 20, hnext;
static uint32_t max_ref;   /* the highest ref we granted */
static unsigned nbufs;

static volatile struct desc *desc;
static volatile uint16_t *avail; /* flags, idx, ring[QSIZE] */
static volatile uint8_t *used;   /* flags, idx, ring[QSIZE] of {u32 id, u32 len} */
static uint64_t desc_gpa, avail_gpa, used_gpa;
static uint16_t avail_idx, used_seen;
static struct buf ring, ring2; /* mid-page vring; page-aligned pieces (for the peer) */
static struct slot slots[MAX_SLOTS];
static unsigned nslots, data_bytes = 8192, nblocks = 256;
static unsigned block_bytes;  /* the stride of blocks on the disk: --data */
static int use_foreign;       /* descriptors at guest-physical addresses (FOREIGN regions) */
static int pagemap = -1;
static uint64_t gfns[2048];
static unsigned ngfns;
#define A(b) (use_foreign ? (b)->fgpa : (b)->gpa)
static unsigned long kicks, waits;

static void die(const char *what)
{
    printf("XVM-DOMU-VQ-VERDICT FAIL %s: %s\n", what, strerror(errno));
    exit(1);
}

/* `pages` pages on consecutive refs (Xen) or consecutive memfd pages (host). */
static void grant(struct buf *b, unsigned pages, int writable)
{
    b->pages = pages;
    if (host) {
        if (hnext + pages * PG > hsize) { errno = ENOMEM; die("host memory"); }
        b->p = hmem + hnext;
        b->gpa = b->fgpa = hnext;
        b->ref0 = (uint32_t)(hnext / PG);
        hnext += pages * PG;
        nbufs++;
        return;
    }
    for (int attempt = 0; attempt < 16; attempt++) {
        struct ioctl_gntalloc_alloc_gref *a = calloc(1, sizeof(*a) + pages * sizeof(uint32_t));
        a->domid = 0;
        a->flags = writable ? GNTALLOC_FLAG_WRITABLE : 0;
        a->count = pages;
        if (ioctl(fa, IOCTL_GNTALLOC_ALLOC_GREF, a)) die("ALLOC_GREF");
        int consecutive = 1;
        for (unsigned i = 1; i < pages; i++)
            if (a->gref_ids[i] != a->gref_ids[0] + i) consecutive = 0;
        if (!consecutive) { /* keep it granted (harmless) and try again */
            free(a);
            continue;
        }
        b->p = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fa, a->index);
        if (b->p == MAP_FAILED) die("mmap gntalloc");
        memset(b->p, 0, pages * PG);
        b->fgpa = 0;
        for (unsigned i = 0; i < pages; i++) {
            uint64_t e = 0;
            if (pread(pagemap, &e, 8, ((uintptr_t)b->p / PG + i) * 8) != 8 || !(e >> 63)) break;
            uint64_t g = e & ((1ull << 55) - 1);
            if (ngfns < sizeof(gfns) / sizeof(gfns[0])) gfns[ngfns++] = g;
            if (!i) b->fgpa = g << 12;
        }
        b->ref0 = a->gref_ids[0];
        b->index = a->index;
        b->gpa = GRANT_BIT | ((uint64_t)b->ref0 << 12);
        for (unsigned i = 0; i < pages; i++)
            if (a->gref_ids[i] > max_ref) max_ref = a->gref_ids[i];
        free(a);
        nbufs++;
        return;
    }
    errno = EAGAIN;
    die("no consecutive refs after 16 tries");
}

static void bell_notify(struct bell *b)
{
    if (host) {
        char c = 1;
        if (write(b->tx, &c, 1) != 1) die("write fifo");
        return;
    }
    struct ioctl_evtchn_notify n = {.port = b->port};
    if (ioctl(b->fd, IOCTL_EVTCHN_NOTIFY, &n)) die("EVTCHN_NOTIFY");
}

/* Waits for an event from dom0; 0 on timeout. */
static int bell_wait(struct bell *b, int ms)
{
    struct pollfd p = {.fd = host ? b->rx : b->fd, .events = POLLIN};
    int r = poll(&p, 1, ms);
    if (r < 0) die("poll");
    if (r == 0) return 0;
    if (host) {
        char buf[64];
        if (read(b->rx, buf, sizeof(buf)) <= 0) die("read fifo");
        return 1;
    }
    unsigned got[16];
    ssize_t n = read(b->fd, got, sizeof(got));
    if (n < 4) die("read evtchn");
    if (write(b->fd, &b->port, sizeof(b->port)) != sizeof(b->port)) die("unmask evtchn");
    return 1;
}

static void bell_open(struct bell *b, const char *dir, const char *tx, const char *rx)
{
    if (host) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", dir, tx);
        if ((mkfifo(path, 0600) && errno != EEXIST) || (b->tx = open(path, O_RDWR)) < 0) die(path);
        snprintf(path, sizeof(path), "%s/%s", dir, rx);
        if ((mkfifo(path, 0600) && errno != EEXIST) || (b->rx = open(path, O_RDWR)) < 0) die(path);
        return;
    }
    if ((b->fd = open("/dev/xen/evtchn", O_RDWR)) < 0) die("open /dev/xen/evtchn");
    struct ioctl_evtchn_bind_unbound_port u = {.remote_domain = 0};
    int p = ioctl(b->fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &u);
    if (p < 0) die("EVTCHN_BIND_UNBOUND_PORT");
    b->port = (unsigned)p;
}

static void notify(void) { kicks++; bell_notify(&data_bell); }
static int wait_event(int ms) { waits++; return bell_wait(&data_bell, ms); }

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint8_t pat(unsigned phase, unsigned block, unsigned j)
{
    return (uint8_t)(j * 7u + (j >> 9) * 3u + block * 13u + phase * 101u + 1u);
}

/* One request in flight: which block, which direction. */
static void publish(unsigned s, int type, unsigned block, uint64_t data_gpa)
{
    struct slot *sl = &slots[s];
    uint8_t *h = sl->hdr.p + HDR_OFF;
    uint32_t t = (uint32_t)type, z = 0;
    uint64_t sector = (uint64_t)block * (block_bytes / 512);
    memcpy(h, &t, 4); memcpy(h + 4, &z, 4); memcpy(h + 8, &sector, 8);
    sl->status.p[STATUS_OFF] = 0xee;
    uint16_t d0 = (uint16_t)(s * 3);
    desc[d0].addr = A(&sl->hdr) + HDR_OFF; desc[d0].len = 16; desc[d0].flags = F_NEXT; desc[d0].next = d0 + 1;
    desc[d0 + 1].addr = data_gpa; desc[d0 + 1].len = data_bytes;
    desc[d0 + 1].flags = F_NEXT | (type == T_IN ? F_WRITE : 0); desc[d0 + 1].next = d0 + 2;
    desc[d0 + 2].addr = A(&sl->status) + STATUS_OFF; desc[d0 + 2].len = 1; desc[d0 + 2].flags = F_WRITE; desc[d0 + 2].next = 0;
    avail[2 + avail_idx % QSIZE] = d0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    avail_idx++;
    avail[1] = avail_idx;
    sl->busy = 1;
}

struct done { unsigned slot; uint32_t len; };

/* Used entries not seen yet, into out[]; returns how many. */
static int reap(struct done *out, char *err, size_t errlen)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t idx = *(volatile uint16_t *)(used + 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    int n = 0;
    while (used_seen != idx) {
        volatile uint8_t *e = used + 4 + 8 * (used_seen % QSIZE);
        uint32_t id = *(volatile uint32_t *)e, len = *(volatile uint32_t *)(e + 4);
        if (id % 3 || id / 3 >= nslots || !slots[id / 3].busy) {
            snprintf(err, errlen, "used id %u is no chain in flight", id);
            return -1;
        }
        slots[id / 3].busy = 0;
        out[n].slot = id / 3;
        out[n].len = len;
        n++;
        used_seen++;
    }
    return n;
}

/* Checks a completed request; returns 0 or fills err. `expect_fail`: the fault case. */
static int check(unsigned phase, struct slot *sl, int type, unsigned block, uint32_t len, char *err, size_t n)
{
    uint8_t st = sl->status.p[STATUS_OFF];
    uint32_t t; uint64_t sector;
    memcpy(&t, sl->hdr.p + HDR_OFF, 4); memcpy(&sector, sl->hdr.p + HDR_OFF + 8, 8);
    if (t != (uint32_t)type || sector != (uint64_t)block * (block_bytes / 512)) {
        snprintf(err, n, "block %u: the read-only header changed", block);
        return -1;
    }
    if (st != 0) {
        snprintf(err, n, "block %u %s: status %u, used len %u", block, type == T_IN ? "read" : "write", st, len);
        return -1;
    }
    uint32_t want = type == T_IN ? data_bytes + 1 : 1;
    if (len != want) {
        snprintf(err, n, "block %u: used len %u, want %u", block, len, want);
        return -1;
    }
    struct buf *b = type == T_IN ? &sl->rdata : &sl->wdata;
    for (unsigned j = 0; j < data_bytes; j++)
        if (b->p[j] != pat(phase, block, j)) {
            snprintf(err, n, "block %u %s byte %u: %#x, want %#x", block,
                     type == T_IN ? "read back" : "write data (read-only)", j, b->p[j], pat(phase, block, j));
            return -1;
        }
    return 0;
}

/* Writes then reads back every block at queue depth `depth`; returns requests/s or -1. */
static double run_phase(unsigned phase, unsigned depth, char *err, size_t n)
{
    double t0 = now();
    unsigned total = 2 * nblocks, next = 0, done = 0, inflight = 0;
    unsigned blk[MAX_SLOTS]; int typ[MAX_SLOTS];
    struct done d[QSIZE];
    while (done < total) {
        unsigned published = 0;
        /* All writes complete before the first read is published. */
        while (inflight < depth && next < total && (next < nblocks || done >= nblocks)) {
            unsigned s = 0;
            while (slots[s].busy) s++;
            int type = next < nblocks ? T_OUT : T_IN;
            unsigned block = next % nblocks;
            struct slot *sl = &slots[s];
            if (type == T_OUT) {
                for (unsigned j = 0; j < data_bytes; j++) sl->wdata.p[j] = pat(phase, block, j);
            } else {
                memset(sl->rdata.p, 0, data_bytes);
            }
            blk[s] = block; typ[s] = type;
            publish(s, type, block, type == T_OUT ? A(&sl->wdata) : A(&sl->rdata));
            next++; inflight++; published++;
        }
        if (published) notify();
        int k = reap(d, err, n);
        if (k < 0) return -1;
        if (k == 0) {
            if (!wait_event(WAIT_MS)) {
                snprintf(err, n, "no completion in %d s (%u of %u done, %u in flight)", WAIT_MS / 1000, done, total, inflight);
                return -1;
            }
            continue;
        }
        for (int i = 0; i < k; i++) {
            unsigned s = d[i].slot;
            if (check(phase, &slots[s], typ[s], blk[s], d[i].len, err, n)) return -1;
            done++; inflight--;
        }
    }
    return total / (now() - t0);
}

/* A batch of 8 writes (blocks first_block..), one of them (`bad`) with its data at `bad_gpa`
 * that the daemon must not be able to reach: `before_notify` (if any) runs after the batch is
 * published and before the notification. That one fails (IOERR or used len 0), the other 7
 * complete and read back. `what` names the bad buffer in errors. */
static int fault_batch(unsigned phase, unsigned first_block, unsigned bad, uint64_t bad_gpa,
                       void (*before_notify)(void), const char *what, uint8_t *bad_status,
                       uint32_t *bad_len, char *err, size_t n)
{
    unsigned batch = nslots < 8 ? nslots : 8, done = 0;
    unsigned blk[MAX_SLOTS];
    struct done d[QSIZE];
    for (unsigned s = 0; s < batch; s++) {
        blk[s] = first_block + s;
        for (unsigned j = 0; j < data_bytes; j++) slots[s].wdata.p[j] = pat(phase, blk[s], j);
        publish(s, T_OUT, blk[s], s == bad ? bad_gpa : slots[s].wdata.gpa);
    }
    if (before_notify) before_notify();
    notify();
    while (done < batch) {
        int k = reap(d, err, n);
        if (k < 0) return -1;
        if (k == 0 && !wait_event(WAIT_MS)) {
            snprintf(err, n, "no completion in %d s (%u of %u done)", WAIT_MS / 1000, done, batch);
            return -1;
        }
        for (int i = 0; i < k; i++, done++) {
            unsigned s = d[i].slot;
            if (s == bad) {
                *bad_status = slots[s].status.p[STATUS_OFF];
                *bad_len = d[i].len;
                if (*bad_status == 0) {
                    snprintf(err, n, "the write at %s succeeded (used len %u)", what, *bad_len);
                    return -1;
                }
            } else if (check(phase, &slots[s], T_OUT, blk[s], d[i].len, err, n)) {
                return -1;
            }
        }
    }
    /* Read the good ones back. */
    for (unsigned s = 0; s < batch; s++) {
        if (s == bad) continue;
        memset(slots[s].rdata.p, 0, data_bytes);
        publish(s, T_IN, blk[s], slots[s].rdata.gpa);
    }
    notify();
    for (done = 0; done < batch - 1;) {
        int k = reap(d, err, n);
        if (k < 0) return -1;
        if (k == 0 && !wait_event(WAIT_MS)) {
            snprintf(err, n, "read back: no completion in %d s", WAIT_MS / 1000);
            return -1;
        }
        for (int i = 0; i < k; i++, done++)
            if (check(phase, &slots[d[i].slot], T_IN, blk[d[i].slot], d[i].len, err, n)) return -1;
    }
    return 0;
}

/* A batch of 8 writes, one of them with its data at a ref never granted: that one fails
 * (IOERR or used len 0), the other 7 complete and read back. */
static int fault_ungranted(unsigned phase, char *err, size_t n)
{
    unsigned batch = nslots < 8 ? nslots : 8;
    uint64_t bad_gpa = host ? (uint64_t)hsize + (1u << 20) : GRANT_BIT | ((uint64_t)(max_ref + 1000) << 12);
    char what[64];
    uint8_t bad_status = 0; uint32_t bad_len = 0;
    snprintf(what, sizeof(what), "never-granted ref %u", max_ref + 1000);
    if (fault_batch(phase, 0, batch / 2, bad_gpa, NULL, what, &bad_status, &bad_len, err, n)) return -1;
    snprintf(err, n, "the request at never-granted ref %u got status %u (0xee: not written), used len %u; "
             "the other %u of its batch completed and read back", max_ref + 1000, bad_status, bad_len, batch - 1);
    return 0;
}

/* The revoke case's data buffer: granted read-only like a write's data, its own pages (its
 * gfns are not reported: no FOREIGN region covers it), used by that one request only. */
static struct buf victim;
static int revoke_rc, revoke_errno;

/* Ends foreign access to the victim's grants while its request sits published in the avail
 * ring, not yet notified: munmap drops our mapping, DEALLOC_GREF the grant; gntalloc then
 * ends foreign access (dom0 has not mapped it: the daemon maps on demand, per request) and
 * frees the refs. Host mode has no grants: the request's data points outside the memfd. */
static void revoke_victim(void)
{
    if (host) return;
    revoke_rc = munmap(victim.p, victim.pages * PG);
    if (revoke_rc) { revoke_errno = errno; return; }
    victim.p = NULL;
    struct ioctl_gntalloc_dealloc_gref dg = {.index = victim.index, .count = victim.pages};
    revoke_rc = ioctl(fa, IOCTL_GNTALLOC_DEALLOC_GREF, &dg);
    if (revoke_rc) revoke_errno = errno;
}

/* A batch of 8 writes published; before the notification, the domU revokes the grant of one
 * request's data buffer (revoke_victim). That request fails (IOERR or used len 0), the other
 * 7 complete and read back, and a full checked pass at depth 8 follows (the daemon keeps
 * serving). That nothing stays mapped is the daemon's exit status (xen-vq/daemon-exit). */
static int fault_revoked(unsigned phase, char *err, size_t n)
{
    unsigned batch = nslots < 8 ? nslots : 8, bad = batch / 2 + 1;
    if (bad >= batch) bad = batch - 1;
    uint64_t bad_gpa = host ? (uint64_t)hsize + (2u << 20) : victim.gpa;
    for (unsigned j = 0; j < data_bytes && victim.p; j++) victim.p[j] = pat(phase, 8 + bad, j);
    char what[96];
    uint8_t bad_status = 0; uint32_t bad_len = 0;
    snprintf(what, sizeof(what), "revoked refs %u-%u", victim.ref0, victim.ref0 + victim.pages - 1);
    int r = fault_batch(phase, 8, bad, bad_gpa, revoke_victim, what, &bad_status, &bad_len, err, n);
    if (revoke_rc) {
        errno = revoke_errno;
        snprintf(err, n, "revoking refs %u-%u (munmap, DEALLOC_GREF) failed: %s", victim.ref0,
                 victim.ref0 + victim.pages - 1, strerror(errno));
        return -1;
    }
    if (r) return -1;
    char e2[256];
    double rps = run_phase(phase + 1, 8, e2, sizeof(e2));
    if (rps < 0) {
        snprintf(err, n, "after the revoked request, the checked pass failed: %s", e2);
        return -1;
    }
    if (host)
        snprintf(err, n, "host mode (no grants to revoke): the request with data outside the memory got status %u, "
                 "used len %u; the other %u of its batch completed and read back; then %u writes and %u reads at "
                 "depth 8 checked byte for byte rps=%.0f", bad_status, bad_len, batch - 1, nblocks, nblocks, rps);
    else
        snprintf(err, n, "the write whose data grant (refs %u-%u) the domU revoked (munmap + DEALLOC_GREF) after "
                 "publishing it and before notifying got status %u (0xee: not written), used len %u; the other %u "
                 "of its batch completed and read back; then %u writes and %u reads at depth 8 checked byte for "
                 "byte rps=%.0f", victim.ref0, victim.ref0 + victim.pages - 1, bad_status, bad_len, batch - 1,
                 nblocks, nblocks, rps);
    return 0;
}

/* The frontend disconnects from the daemon right after forwarding the kick of a batch of
 * writes, reconnects, and has the driver reset its queue (on the control channel) before the
 * new connection starts it at index 0; then a full write and read-back pass at depth 8. */
static int fault_reconnect(unsigned phase, char *err, size_t n)
{
    unsigned batch = nslots < 16 ? nslots : 16;
    printf("XVM-DOMU-VQ-PHASE reconnect\n");
    sleep(1); /* no kicks for a while: dom0's frontend reads the line above and arms */
    for (unsigned s = 0; s < batch; s++) {
        for (unsigned j = 0; j < data_bytes; j++) slots[s].wdata.p[j] = pat(phase, s, j);
        publish(s, T_OUT, s, slots[s].wdata.gpa);
    }
    notify();
    if (!bell_wait(&ctl_bell, WAIT_MS)) {
        snprintf(err, n, "no queue reset from dom0 in %d s", WAIT_MS / 1000);
        return -1;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t completed = (uint16_t)(*(volatile uint16_t *)(used + 2) - used_seen);
    /* Reset: the new connection starts at avail index 0 over a clean ring. */
    memset((void *)desc, 0, 16 * QSIZE);
    memset((void *)avail, 0, 6 + 2 * QSIZE);
    memset((void *)used, 0, 6 + 8 * QSIZE);
    avail_idx = used_seen = 0;
    for (unsigned s = 0; s < nslots; s++) slots[s].busy = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bell_notify(&ctl_bell);
    if (!bell_wait(&ctl_bell, WAIT_MS)) {
        snprintf(err, n, "no ready from dom0 in %d s after the reset", WAIT_MS / 1000);
        return -1;
    }
    unsigned long k0 = kicks;
    double rps = run_phase(phase + 1, 8, err, n);
    if (rps < 0) return -1;
    snprintf(err, n, "%u of %u writes had completed when dom0's frontend disconnected right after forwarding their kick "
             "(the daemon finishes the batch it holds before the connection ends); after "
             "the reconnect and a queue reset, %u writes and %u reads at depth 8 checked byte for byte "
             "(%lu notifications) rps=%.0f", completed, batch, nblocks, nblocks, kicks - k0, rps);
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, unsigned n)
{
    qsort(v, n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* GRANT (descriptors at grant addresses: on-demand regions) against FOREIGN (the same
 * buffers at their guest-physical addresses: FOREIGN regions dom0's frontend made from our
 * gfns, mapped up front: the ceiling), in interleaved rounds (order flipped each round), at
 * depths 1, 8 and 32: 4 KiB writes then reads of 128 blocks, checked as always. Per depth:
 * medians and the spread of the per-round ratios FOREIGN/GRANT. */
static int bench(unsigned phase, unsigned rounds, char *summary, size_t slen)
{
    static const unsigned depths[] = {1, 8, 32};
    unsigned saved_len = data_bytes, saved_blocks = nblocks;
    int failed = 0;
    char err[256];
    if (rounds > 16) rounds = 16;
    for (unsigned s = 0; s < nslots; s++)
        if (!slots[s].hdr.fgpa || !slots[s].wdata.fgpa || !slots[s].rdata.fgpa || !slots[s].status.fgpa) {
            printf("XVM-DOMU-VQ-RESULT bench FAIL slot %u has a buffer without a gfn\n", s);
            return 1;
        }
    data_bytes = 4096;
    nblocks = saved_blocks < 128 ? saved_blocks : 128;
    for (unsigned di = 0; di < 3 && depths[di] <= nslots; di++) {
        double g[16], f[16], ratio[16];
        for (unsigned r = 0; r < rounds; r++) {
            for (unsigned k = 0; k < 2; k++) {
                int foreign = (int)((k + r) % 2);
                use_foreign = foreign;
                double rps = run_phase(phase++, depths[di], err, sizeof(err));
                use_foreign = 0;
                if (rps < 0) {
                    printf("XVM-DOMU-VQ-RESULT bench-depth=%u FAIL %s round %u: %s\n", depths[di],
                           foreign ? "FOREIGN" : "GRANT", r, err);
                    data_bytes = saved_len; nblocks = saved_blocks;
                    return 1;
                }
                (foreign ? f : g)[r] = rps;
            }
            ratio[r] = f[r] / g[r];
            printf("XVM-DOMU-VQ-BENCH depth=%u round=%u grant=%.0f foreign=%.0f\n", depths[di], r, g[r], f[r]);
        }
        double mg = median(g, rounds), mf = median(f, rounds), mr = median(ratio, rounds);
        printf("XVM-DOMU-VQ-RESULT bench-depth=%u PASS %u interleaved rounds of %u 4 KiB writes and reads, all "
               "checked: GRANT (on demand) median %.0f req/s, FOREIGN (ceiling) median %.0f req/s; FOREIGN/GRANT "
               "per round median %.2f (min %.2f, max %.2f)\n", depths[di], rounds, nblocks, mg, mf, mr,
               ratio[0], ratio[rounds - 1]);
        size_t l = strlen(summary);
        snprintf(summary + l, slen - l, "; bench depth %u: GRANT %.0f, FOREIGN %.0f req/s", depths[di], mg, mf);
    }
    data_bytes = saved_len; nblocks = saved_blocks;
    return failed;
}

/* Asks dom0's frontend to serve the queue with daemon `to` from now on: the frontend
 * disconnects, connects to that daemon, has us reset the queue, now on the page-aligned vring
 * (vm-memory reads a mid-page GRANT region at its page's offset 0), and says ready. */
static int switch_to(const char *to, unsigned seq, char *err, size_t n)
{
    printf("XVM-DOMU-VQ-SWITCH seq=%u to=%s\n", seq, to);
    bell_notify(&ctl_bell);
    if (!bell_wait(&ctl_bell, WAIT_MS)) {
        snprintf(err, n, "switch %u to %s: no reset from dom0 in %d s", seq, to, WAIT_MS / 1000);
        return -1;
    }
    desc = (volatile struct desc *)ring2.p;
    avail = (volatile uint16_t *)(ring2.p + PG);
    used = ring2.p + 2 * PG;
    memset(ring2.p, 0, 3 * PG);
    avail_idx = used_seen = 0;
    for (unsigned s = 0; s < nslots; s++) slots[s].busy = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bell_notify(&ctl_bell);
    if (!bell_wait(&ctl_bell, WAIT_MS)) {
        snprintf(err, n, "switch %u to %s: no ready from dom0 in %d s", seq, to, WAIT_MS / 1000);
        return -1;
    }
    return 0;
}

/* Our daemon against the peer (vhost-user-backend 0.24 on vm-memory `xen`), both GRANT
 * (rings in advance, buffers on demand), in interleaved rounds (order flipped each round): each
 * turn runs 4 KiB writes and reads of 64 blocks at depths 1, 8 and 32, all checked. Per
 * depth: medians and the spread of the per-round ratios ours/peer. */
static int peer_bench(unsigned phase, unsigned rounds, char *summary, size_t slen)
{
    static const unsigned depths[] = {1, 8, 32};
    static const char *impls[] = {"ours", "peer"};
    unsigned saved_len = data_bytes, saved_blocks = nblocks, seq = 0;
    double rps[2][3][16];
    char err[256];
    if (rounds > 16) rounds = 16;
    data_bytes = 4096;
    nblocks = saved_blocks < 64 ? saved_blocks : 64;
    for (unsigned r = 0; r < rounds; r++)
        for (unsigned k = 0; k < 2; k++) {
            unsigned im = (k + r) % 2;
            if (switch_to(impls[im], ++seq, err, sizeof(err))) {
                printf("XVM-DOMU-VQ-RESULT peer-bench FAIL %s\n", err);
                return 1;
            }
            for (unsigned di = 0; di < 3 && depths[di] <= nslots; di++) {
                double v = run_phase(phase++, depths[di], err, sizeof(err));
                if (v < 0) {
                    printf("XVM-DOMU-VQ-RESULT peer-bench-depth=%u FAIL %s round %u: %s\n", depths[di], impls[im], r, err);
                    return 1;
                }
                rps[im][di][r] = v;
            }
        }
    data_bytes = saved_len; nblocks = saved_blocks;
    for (unsigned di = 0; di < 3 && depths[di] <= nslots; di++) {
        double ratio[16];
        for (unsigned r = 0; r < rounds; r++) {
            ratio[r] = rps[0][di][r] / rps[1][di][r];
            printf("XVM-DOMU-VQ-PEER depth=%u round=%u ours=%.0f peer=%.0f\n", depths[di], r, rps[0][di][r], rps[1][di][r]);
        }
        double mo = median(rps[0][di], rounds), mp = median(rps[1][di], rounds), mr = median(ratio, rounds);
        printf("XVM-DOMU-VQ-RESULT peer-depth=%u PASS %u interleaved rounds of 64 4 KiB writes and reads, all checked, "
               "both GRANT: ours median %.0f req/s, peer (vhost-user-backend + vm-memory xen) median %.0f req/s; "
               "ours/peer per round median %.2f (min %.2f, max %.2f)\n", depths[di], rounds, mo, mp, mr,
               ratio[0], ratio[rounds - 1]);
        size_t l = strlen(summary);
        snprintf(summary + l, slen - l, "; depth %u ours/peer %.2fx", depths[di], mr);
    }
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    const char *dir = NULL, *depths = "1,8,32";
    int fault = 1;
    unsigned bench_rounds = 5, peer_rounds = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) { host = 1; dir = argv[++i]; }
        else if (!strcmp(argv[i], "--depths") && i + 1 < argc) depths = argv[++i];
        else if (!strcmp(argv[i], "--blocks") && i + 1 < argc) nblocks = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--data") && i + 1 < argc) data_bytes = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-fault")) fault = 0;
        else if (!strcmp(argv[i], "--bench") && i + 1 < argc) bench_rounds = (unsigned)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--peer-rounds") && i + 1 < argc) peer_rounds = (unsigned)atoi(argv[++i]);
        else { printf("XVM-DOMU-VQ-VERDICT FAIL usage: %s [--host DIR] [--depths 1,8,32] [--blocks K] [--data BYTES] [--no-fault]\n", argv[0]); return 2; }
    }
    if (!data_bytes || data_bytes % 512) { errno = EINVAL; die("--data must be a multiple of 512"); }
    block_bytes = data_bytes;
    unsigned maxd = 0;
    for (const char *p = depths; *p;) {
        unsigned d = (unsigned)strtoul(p, (char **)&p, 10);
        if (d > maxd) maxd = d;
        if (*p == ',') p++; else if (*p) { errno = EINVAL; die("--depths"); }
    }
    nslots = maxd < 8 ? 8 : maxd;
    if (nslots > MAX_SLOTS) { errno = EINVAL; die("depth above 32"); }

    if (host) {
        memfd = memfd_create("domu-vq", 0);
        if (memfd < 0 || ftruncate(memfd, (off_t)hsize)) die("memfd");
        hmem = mmap(NULL, hsize, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (hmem == MAP_FAILED) die("mmap memfd");
        hnext = PG; /* gpa 0 stays unused */
    } else {
        if ((fa = open("/dev/xen/gntalloc", O_RDWR)) < 0) die("open /dev/xen/gntalloc");
        if ((pagemap = open("/proc/self/pagemap", O_RDONLY)) < 0) die("open /proc/self/pagemap");
    }
    bell_open(&data_bell, dir, "kick", "call");
    bell_open(&ctl_bell, dir, "ctl-up", "ctl-down");
    /* The ring: 2 writable pages, desc at 0x840, avail after it, used after that. */
    grant(&ring, 2, 1);
    memset(ring.p, 0, 2 * PG);
    unsigned aoff = RING_OFF + 16 * QSIZE, uoff = (aoff + 6 + 2 * QSIZE + 3) & ~3u;
    desc = (volatile struct desc *)(ring.p + RING_OFF);
    avail = (volatile uint16_t *)(ring.p + aoff);
    used = ring.p + uoff;
    desc_gpa = ring.gpa + RING_OFF; avail_gpa = ring.gpa + aoff; used_gpa = ring.gpa + uoff;
    /* The second vring: each piece at the start of its own page (3 pages, consecutive refs). */
    grant(&ring2, 3, 1);
    memset(ring2.p, 0, 3 * PG);
    unsigned dpages = (block_bytes + PG - 1) / PG;
    uint32_t first_buf_ref = 0;
    for (unsigned s = 0; s < nslots; s++) {
        grant(&slots[s].hdr, 1, 0);
        grant(&slots[s].wdata, dpages, 0);
        grant(&slots[s].rdata, dpages, 1);
        grant(&slots[s].status, 1, 1);
        if (!s) first_buf_ref = slots[s].hdr.ref0;
    }
    if (fault) { /* fault-revoked's data buffer; its gfns stay out of the report */
        unsigned g = ngfns;
        grant(&victim, dpages, 0);
        ngfns = g;
    }
    if (!host) {
        printf("XVM-DOMU-VQ-GFNS ");
        for (unsigned i = 0; i < ngfns; i++) printf("%s%#llx", i ? "," : "", (unsigned long long)gfns[i]);
        printf("\n");
    }
    if (host)
        printf("XVM-DOMU-VQ mode=host pid=%d memfd=%d size=%zu dir=%s", getpid(), memfd, hsize, dir);
    else
        printf("XVM-DOMU-VQ mode=xen port=%u ctl_port=%u", data_bell.port, ctl_bell.port);
    printf(" desc2=%#llx avail2=%#llx used2=%#llx peer_rounds=%u", (unsigned long long)ring2.gpa,
           (unsigned long long)(ring2.gpa + PG), (unsigned long long)(ring2.gpa + 2 * PG), peer_rounds);
    printf(" qsize=%u desc=%#llx avail=%#llx used=%#llx ring_refs=%u-%u bufs=%u buf_refs=%u-%u data=%u slots=%u blocks=%u depths=%s faults=%d bench=%u\n",
           QSIZE, (unsigned long long)desc_gpa, (unsigned long long)avail_gpa, (unsigned long long)used_gpa,
           ring.ref0, ring.ref0 + 1, nbufs - 1, first_buf_ref, host ? (unsigned)(hnext / PG) - 1 : max_ref,
           data_bytes, nslots, nblocks, depths, fault, bench_rounds);
    /* The init retries a run that died before this point (dom0 has seen nothing to use). */
    if (!host) close(open("/tmp/domu-vq.announced", O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    /* dom0's frontend says it is ready with a first event. */
    if (!wait_event(600 * 1000)) { errno = ETIMEDOUT; die("no event from dom0 in 600 s"); }

    int failed = 0;
    unsigned phase = 0;
    char err[512], summary[768] = "";
    for (const char *p = depths; *p; phase++) {
        unsigned depth = (unsigned)strtoul(p, (char **)&p, 10);
        if (*p == ',') p++;
        unsigned long k0 = kicks, w0 = waits;
        err[0] = 0;
        double rps = run_phase(phase, depth, err, sizeof(err));
        if (rps < 0) {
            failed++;
            printf("XVM-DOMU-VQ-RESULT depth=%u FAIL %s\n", depth, err);
            break; /* the ring state is unknown */
        }
        printf("XVM-DOMU-VQ-RESULT depth=%u PASS %u writes of %u B then %u reads checked byte for byte, read-only "
               "header and write data untouched; %lu notifications, %lu waits rps=%.0f\n",
               depth, nblocks, data_bytes, nblocks, kicks - k0, waits - w0, rps);
        size_t l = strlen(summary);
        snprintf(summary + l, sizeof(summary) - l, "%sdepth %u: %.0f req/s", l ? ", " : "", depth, rps);
    }
    if (fault && !failed) {
        err[0] = 0;
        int r = fault_ungranted(phase++, err, sizeof(err));
        printf("XVM-DOMU-VQ-RESULT fault-ungranted %s %s\n", r ? "FAIL" : "PASS", err);
        failed += r != 0;
        phase++;
    }
    if (fault && !failed) {
        err[0] = 0;
        int r = fault_revoked(phase, err, sizeof(err));
        printf("XVM-DOMU-VQ-RESULT fault-revoked %s %s\n", r ? "FAIL" : "PASS", err);
        failed += r != 0;
        phase += 2;
    }
    if (fault && !failed) {
        err[0] = 0;
        int r = fault_reconnect(phase, err, sizeof(err));
        printf("XVM-DOMU-VQ-RESULT fault-reconnect %s %s\n", r ? "FAIL" : "PASS", err);
        failed += r != 0;
    }
    if (bench_rounds && !failed) failed += bench(phase + 2, bench_rounds, summary, sizeof(summary));
    if (peer_rounds && !failed) failed += peer_bench(phase + 200, peer_rounds, summary, sizeof(summary));
    if (failed)
        printf("XVM-DOMU-VQ-VERDICT FAIL %d case(s) failed (%s)\n", failed, summary);
    else
        printf("XVM-DOMU-VQ-VERDICT PASS every byte read back as written, read-only buffers untouched (%s)\n", summary);
    return failed != 0;
}
