/* guest-io: the HVM domU's checks and benchmarks of Linux's virtio drivers (ci/xen/hvm/README.md),
 * and dom0's check of the blk image. Static C, run by ci/xen/hvm/guest-init and dom0's run script.
 *
 *   guest-io rng BYTES BLOCK                  read /dev/hwrng; bytes, seconds, distinct values
 *   guest-io blk-verify DEV SEED AT MIB       a pattern written with O_DIRECT at AT MiB (4 KiB to
 *                                             2 MiB requests, then 32 threads at once), read back
 *                                             O_DIRECT and buffered, every byte compared
 *   guest-io blk-bench DEV QD BS SECS MODE AT SPAN_MIB  QD threads of O_DIRECT I/O within
 *                                             [AT, AT+SPAN) MiB (MODE randread|randwrite|read|write):
 *                                             IOPS, p50, p99
 *   guest-io loop-verify DEV SEED AT SECS     blk-verify of 8 MiB at AT again and again for SECS
 *                                             (the daemon restart case): errors must stay 0
 *   guest-io verify-file PATH SEED AT MIB     dom0: the image holds blk-verify's pattern
 * One result line each: "GIO <what> PASS|FAIL key=value ...".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static uint8_t pat(uint64_t off, uint32_t seed) { return (uint8_t)((off * 7) ^ (off >> 12) * 13 ^ (off >> 20) ^ seed); }
static void fill(uint8_t *b, uint64_t off, size_t len, uint32_t seed) { for (size_t i = 0; i < len; i++) b[i] = pat(off + i, seed); }
static long check(const uint8_t *b, uint64_t off, size_t len, uint32_t seed) {
    for (size_t i = 0; i < len; i++)
        if (b[i] != pat(off + i, seed)) return (long)i;
    return -1;
}
static void *abuf(size_t n) { void *p; if (posix_memalign(&p, 4096, n)) { perror("memalign"); exit(1); } return p; }
static int pw(int fd, const void *b, size_t n, uint64_t off) {
    size_t d = 0; while (d < n) { ssize_t r = pwrite(fd, (const char *)b + d, n - d, off + d); if (r <= 0) return r < 0 ? -errno : -EIO; d += r; } return 0;
}
static int pr(int fd, void *b, size_t n, uint64_t off) {
    size_t d = 0; while (d < n) { ssize_t r = pread(fd, (char *)b + d, n - d, off + d); if (r <= 0) return r < 0 ? -errno : -EIO; d += r; } return 0;
}

static int cmd_rng(uint64_t bytes, size_t block) {
    int fd = open("/dev/hwrng", O_RDONLY);
    if (fd < 0) { printf("GIO rng FAIL open /dev/hwrng: %s\n", strerror(errno)); return 1; }
    uint8_t *b = malloc(block); unsigned seen[256] = {0}; uint64_t got = 0; double t0 = now();
    while (got < bytes) {
        ssize_t r = read(fd, b, block);
        if (r <= 0) { printf("GIO rng FAIL read after %llu bytes: %s\n", (unsigned long long)got, r < 0 ? strerror(errno) : "EOF"); return 1; }
        for (ssize_t i = 0; i < r; i++) seen[b[i]]++;
        got += r;
    }
    double s = now() - t0; int distinct = 0; for (int i = 0; i < 256; i++) distinct += seen[i] != 0;
    printf("GIO rng %s bytes=%llu secs=%.3f bytes_per_sec=%.0f distinct=%d\n", distinct == 256 || bytes < 2048 ? "PASS" : "FAIL",
           (unsigned long long)got, s, got / s, distinct);
    return 0;
}

/* blk-verify: phase 1 sequential mixed sizes over [0, mib/2), phase 2 32 threads over [mib/2, mib) */
struct job { int fd; uint64_t off, len; size_t bs; uint32_t seed; int err; uint64_t reqs; };
static void *writer(void *a) {
    struct job *j = a; uint8_t *b = abuf(j->bs);
    for (uint64_t o = j->off; o < j->off + j->len; o += j->bs) {
        size_t n = j->bs; if (o + n > j->off + j->len) n = j->off + j->len - o;
        fill(b, o, n, j->seed);
        int r = pw(j->fd, b, n, o); if (r) { j->err = r; break; } j->reqs++;
    }
    free(b); return NULL;
}
static int verify_range(int fd, uint64_t off, uint64_t len, uint32_t seed, const char *how, char *why) {
    size_t bs = 1 << 20; uint8_t *b = abuf(bs);
    for (uint64_t o = off; o < off + len; o += bs) {
        size_t n = bs; if (o + n > off + len) n = off + len - o;
        int r = pr(fd, b, n, o); if (r) { sprintf(why, "%s read at %llu: %s", how, (unsigned long long)o, strerror(-r)); free(b); return 1; }
        long bad = check(b, o, n, seed);
        if (bad >= 0) { sprintf(why, "%s byte %llu is %#x, want %#x", how, (unsigned long long)(o + bad), b[bad], pat(o + bad, seed)); free(b); return 1; }
    }
    free(b); return 0;
}
static int blk_verify(const char *dev, uint32_t seed, uint64_t at, uint64_t mib, int quiet, uint64_t *reqs_out) {
    uint64_t base = at << 20, total = mib << 20, half = total / 2; char why[256] = "";
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) { printf("GIO blk-verify FAIL open %s: %s\n", dev, strerror(errno)); return 1; }
    static const size_t sizes[] = {4096, 65536, 1 << 20, 2 << 20, 12288, 131072};
    uint8_t *b = abuf(2 << 20); uint64_t reqs = 0; double t0 = now(); int k = 0;
    for (uint64_t o = 0; o < half; k++) {
        size_t n = sizes[k % 6]; if (o + n > half) n = half - o;
        fill(b, base + o, n, seed); int r = pw(fd, b, n, base + o);
        if (r) { printf("GIO blk-verify FAIL O_DIRECT write of %zu at %llu: %s\n", n, (unsigned long long)o, strerror(-r)); return 1; }
        o += n; reqs++;
    }
    free(b);
    enum { T = 32 }; pthread_t th[T]; struct job j[T]; uint64_t per = (total - half) / T;
    for (int i = 0; i < T; i++) {
        j[i] = (struct job){ fd, base + half + i * per, per, (size_t)4096 << (i % 7), seed, 0, 0 };
        pthread_create(&th[i], NULL, writer, &j[i]);
    }
    for (int i = 0; i < T; i++) { pthread_join(th[i], NULL); reqs += j[i].reqs;
        if (j[i].err) { printf("GIO blk-verify FAIL thread %d: %s\n", i, strerror(-j[i].err)); return 1; } }
    if (fsync(fd)) { printf("GIO blk-verify FAIL fsync: %s\n", strerror(errno)); return 1; }
    if (verify_range(fd, base, total, seed, "O_DIRECT", why)) { printf("GIO blk-verify FAIL %s\n", why); return 1; }
    close(fd);
    int bfd = open(dev, O_RDONLY);
    /* BLKFLSBUF drops the page cache of a block device; a plain file (a test on the host) has none to drop. */
    if (bfd < 0 || (ioctl(bfd, BLKFLSBUF, 0) && errno != ENOTTY)) { printf("GIO blk-verify FAIL buffered open/BLKFLSBUF: %s\n", strerror(errno)); return 1; }
    if (verify_range(bfd, base, total, seed, "buffered", why)) { printf("GIO blk-verify FAIL %s\n", why); return 1; }
    close(bfd);
    if (!quiet) printf("GIO blk-verify PASS bytes=%llu write_requests=%llu threads=%d secs=%.2f\n", (unsigned long long)total,
                       (unsigned long long)reqs, T, now() - t0);
    if (reqs_out) *reqs_out += reqs;
    return 0;
}

struct bj { int fd; int wr, rnd; size_t bs; uint64_t base, span; double end; unsigned seed; uint64_t n; float *lat; uint64_t cap; int err; int idx, qd; };
static void *bench_worker(void *a) {
    struct bj *j = a; uint8_t *b = abuf(j->bs); memset(b, 0x5a, j->bs);
    uint64_t blocks = j->span / j->bs, seq = (blocks / j->qd) * j->idx;
    while (now() < j->end) {
        uint64_t blk = j->rnd ? rand_r(&j->seed) % blocks : (seq++ % blocks);
        double t = now();
        uint64_t off = j->base + blk * j->bs;
        int r = j->wr ? pw(j->fd, b, j->bs, off) : pr(j->fd, b, j->bs, off);
        if (r) { j->err = r; break; }
        if (j->n < j->cap) j->lat[j->n] = (float)((now() - t) * 1e6);
        j->n++;
    }
    free(b); return NULL;
}
static int cmpf(const void *a, const void *b) { float x = *(const float *)a, y = *(const float *)b; return (x > y) - (x < y); }
static int blk_bench(const char *dev, int qd, size_t bs, double secs, const char *mode, uint64_t at, uint64_t span_mib) {
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) { printf("GIO blk-bench FAIL open %s: %s\n", dev, strerror(errno)); return 1; }
    int wr = strstr(mode, "write") != NULL, rnd = strncmp(mode, "rand", 4) == 0;
    if (qd < 1 || qd > 256) { printf("GIO blk-bench FAIL qd %d: 1 to 256\n", qd); return 1; }
    pthread_t th[256]; struct bj j[256]; double t0 = now();
    for (int i = 0; i < qd; i++) {
        j[i] = (struct bj){ fd, wr, rnd, bs, at << 20, span_mib << 20, t0 + secs, 1234u + i, 0, malloc(sizeof(float) * 200000), 200000, 0, i, qd };
        pthread_create(&th[i], NULL, bench_worker, &j[i]);
    }
    uint64_t n = 0, kept = 0; for (int i = 0; i < qd; i++) { pthread_join(th[i], NULL); n += j[i].n; kept += j[i].n < j[i].cap ? j[i].n : j[i].cap; }
    double el = now() - t0;
    for (int i = 0; i < qd; i++) if (j[i].err) { printf("GIO blk-bench FAIL %s: %s\n", mode, strerror(-j[i].err)); return 1; }
    float *all = malloc(sizeof(float) * (kept + 1)); uint64_t k = 0;
    for (int i = 0; i < qd; i++) { uint64_t m = j[i].n < j[i].cap ? j[i].n : j[i].cap; memcpy(all + k, j[i].lat, m * sizeof(float)); k += m; }
    qsort(all, k, sizeof(float), cmpf);
    printf("GIO blk-bench PASS mode=%s qd=%d bs=%zu ios=%llu secs=%.3f iops=%.1f p50_us=%.0f p99_us=%.0f\n", mode, qd, bs,
           (unsigned long long)n, el, n / el, k ? all[k / 2] : 0, k ? all[(k * 99) / 100] : 0);
    close(fd); return 0;
}

static int loop_verify(const char *dev, uint32_t seed, uint64_t at, double secs) {
    double end = now() + secs; int rounds = 0; uint64_t reqs = 0;
    while (now() < end) { if (blk_verify(dev, seed + rounds, at, 8, 1, &reqs)) { printf("GIO loop-verify FAIL round %d\n", rounds); return 1; } rounds++; }
    printf("GIO loop-verify PASS rounds=%d write_requests=%llu secs=%.1f last_seed=%u\n", rounds, (unsigned long long)reqs, secs, seed + rounds - 1);
    return 0;
}

static int verify_file(const char *path, uint32_t seed, uint64_t at, uint64_t mib) {
    int fd = open(path, O_RDONLY); char why[256];
    if (fd < 0) { printf("GIO verify-file FAIL open %s: %s\n", path, strerror(errno)); return 1; }
    if (verify_range(fd, at << 20, mib << 20, seed, "image", why)) { printf("GIO verify-file FAIL %s\n", why); return 1; }
    printf("GIO verify-file PASS bytes=%llu\n", (unsigned long long)(mib << 20)); return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 4 && !strcmp(argv[1], "rng")) return cmd_rng(strtoull(argv[2], 0, 0), strtoul(argv[3], 0, 0));
    if (argc >= 6 && !strcmp(argv[1], "blk-verify")) return blk_verify(argv[2], strtoul(argv[3], 0, 0), strtoull(argv[4], 0, 0), strtoull(argv[5], 0, 0), 0, NULL);
    if (argc >= 9 && !strcmp(argv[1], "blk-bench")) return blk_bench(argv[2], atoi(argv[3]), strtoul(argv[4], 0, 0), atof(argv[5]), argv[6], strtoull(argv[7], 0, 0), strtoull(argv[8], 0, 0));
    if (argc >= 6 && !strcmp(argv[1], "loop-verify")) return loop_verify(argv[2], strtoul(argv[3], 0, 0), strtoull(argv[4], 0, 0), atof(argv[5]));
    if (argc >= 6 && !strcmp(argv[1], "verify-file")) return verify_file(argv[2], strtoul(argv[3], 0, 0), strtoull(argv[4], 0, 0), strtoull(argv[5], 0, 0));
    fprintf(stderr, "usage: see the comment at the top of guest-io.c\n"); return 2;
}
