/* qtool: the guest's (and the host's) helper for ci/qemu/run, built with gcc -static.
 *
 *   qtool gen   SEED OFF_MIB MIB                 pattern of [OFF, OFF+MIB) MiB to stdout
 *   qtool write DEV SEED OFF_MIB MIB BS_KIB [P]  the same pattern to DEV with O_DIRECT, fdatasync
 *                                               at the end (and after every MiB with P=1, printing
 *                                               "QT: progress N MiB t=SECS" once N MiB are acknowledged)
 *   qtool bench DEV seq|rand read|write BS_KIB OFF_MIB REGION_MIB SECS
 *                                               O_DIRECT, queue depth 1, for SECS seconds;
 *                                               prints "ops=N bytes=N secs=F iops=F mibs=F"
 *   qtool mark  DEV SECTOR TEXT                  TEXT, zero-padded, into one 512-byte sector with
 *                                               O_DIRECT + fdatasync: the fio mode's signal to the
 *                                               host, which watches the image (the console lags)
 *
 * Pattern: every 512-byte sector is "QTST" + seed (u32 LE) + sector number (u64 LE) + 496
 * bytes of xorshift64* seeded from (seed, sector), so any range can be made on its own and
 * the host checks the image with the same binary. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024L * 1024L)

static uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

static void sector(unsigned char *p, uint32_t seed, uint64_t sec) {
  uint64_t s = splitmix(((uint64_t)seed << 40) ^ sec) | 1;
  memcpy(p, "QTST", 4);
  memcpy(p + 4, &seed, 4);
  memcpy(p + 8, &sec, 8);
  for (int k = 16; k < 512; k += 8) {
    s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
    uint64_t v = s * 0x2545F4914F6CDD1DULL;
    memcpy(p + k, &v, 8);
  }
}

static void fill(unsigned char *buf, size_t len, uint32_t seed, uint64_t first_sec) {
  for (size_t o = 0; o < len; o += 512) sector(buf + o, seed, first_sec + o / 512);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void *abuf(size_t len) {
  void *p;
  if (posix_memalign(&p, 4096, len)) { perror("posix_memalign"); exit(1); }
  return p;
}

static int xopen(const char *dev, int flags) {
  int fd = open(dev, flags | O_DIRECT);
  if (fd < 0) { fprintf(stderr, "open %s: %s\n", dev, strerror(errno)); exit(1); }
  return fd;
}

static int gen(int argc, char **argv) {
  if (argc != 5) return 2;
  uint32_t seed = strtoul(argv[2], 0, 0);
  long off = atol(argv[3]), mib = atol(argv[4]);
  static unsigned char buf[65536];
  for (long b = 0; b < mib * 16; b++) {
    fill(buf, sizeof buf, seed, (uint64_t)off * 2048 + (uint64_t)b * 128);
    size_t o = 0;
    while (o < sizeof buf) {
      ssize_t w = write(1, buf + o, sizeof buf - o);
      if (w <= 0) return 1;
      o += w;
    }
  }
  return 0;
}

static int wr(int argc, char **argv) {
  if (argc != 7 && argc != 8) return 2;
  const char *dev = argv[2];
  uint32_t seed = strtoul(argv[3], 0, 0);
  long off = atol(argv[4]), mib = atol(argv[5]), bs = atol(argv[6]) * 1024;
  int progress = argc == 8 && atoi(argv[7]);
  if (bs <= 0 || MIB % bs) { fprintf(stderr, "BS_KIB must divide 1024\n"); return 2; }
  int fd = xopen(dev, O_WRONLY);
  unsigned char *buf = abuf(bs);
  double t0 = now();
  for (long m = 0; m < mib; m++) {
    for (long o = 0; o < MIB; o += bs) {
      uint64_t pos = (uint64_t)(off + m) * MIB + o;
      fill(buf, bs, seed, pos / 512);
      ssize_t w = pwrite(fd, buf, bs, pos);
      if (w != bs) { fprintf(stderr, "pwrite at %llu: %s\n", (unsigned long long)pos, w < 0 ? strerror(errno) : "short"); return 1; }
    }
    if (progress) {
      if (fdatasync(fd)) { perror("fdatasync"); return 1; }
      printf("QT: progress %ld MiB t=%.2fs\n", m + 1, now() - t0);
      fflush(stdout);
    }
  }
  if (fdatasync(fd)) { perror("fdatasync"); return 1; }
  return close(fd) ? 1 : 0;
}

static int bench(int argc, char **argv) {
  if (argc != 9) return 2;
  const char *dev = argv[2];
  int rnd = !strcmp(argv[3], "rand"), writing = !strcmp(argv[4], "write");
  long bs = atol(argv[5]) * 1024, off = atol(argv[6]) * MIB, region = atol(argv[7]) * MIB;
  double secs = atof(argv[8]);
  if (bs <= 0 || region < bs) return 2;
  int fd = xopen(dev, writing ? O_WRONLY : O_RDONLY);
  unsigned char *buf = abuf(bs);
  memset(buf, 0xa5, bs);
  long blocks = region / bs, ops = 0;
  uint64_t s = 0x2545F4914F6CDD1DULL;
  double t0 = now(), t = t0;
  while (t - t0 < secs) {
    long blk;
    if (rnd) { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; blk = (s * 0x2545F4914F6CDD1DULL >> 11) % blocks; }
    else blk = ops % blocks;
    off_t pos = off + (off_t)blk * bs;
    ssize_t n = writing ? pwrite(fd, buf, bs, pos) : pread(fd, buf, bs, pos);
    if (n != bs) { fprintf(stderr, "%s at %lld: %s\n", writing ? "pwrite" : "pread", (long long)pos, n < 0 ? strerror(errno) : "short"); return 1; }
    ops++;
    t = now();
  }
  t = now() - t0;
  printf("ops=%ld bytes=%lld secs=%.3f iops=%.1f mibs=%.2f\n", ops, (long long)ops * bs, t, ops / t,
         (double)ops * bs / MIB / t);
  return close(fd) ? 1 : 0;
}

static int mark(int argc, char **argv) {
  if (argc != 5) return 2;
  int fd = xopen(argv[2], O_WRONLY);
  unsigned char *buf = abuf(512);
  memset(buf, 0, 512);
  strncpy((char *)buf, argv[4], 511);
  if (pwrite(fd, buf, 512, atoll(argv[3]) * 512) != 512 || fdatasync(fd)) { perror("mark"); return 1; }
  return close(fd) ? 1 : 0;
}

int main(int argc, char **argv) {
  int rc = 2;
  if (argc > 1 && !strcmp(argv[1], "gen")) rc = gen(argc, argv);
  else if (argc > 1 && !strcmp(argv[1], "write")) rc = wr(argc, argv);
  else if (argc > 1 && !strcmp(argv[1], "bench")) rc = bench(argc, argv);
  else if (argc > 1 && !strcmp(argv[1], "mark")) rc = mark(argc, argv);
  if (rc == 2) fprintf(stderr, "usage: see the comment at the top of qtool.c\n");
  return rc;
}
