/* vtool: the guest's side of the vsock lab (ci/qemu/vsock/run); busybox has no vsock.
 * Streams are an 8-byte length (LE) then that many bytes of a pattern (stream seed s, byte i:
 * see pat()), checked with CRC-32 (zlib's) and length: the receiver answers 8 bytes, crc32
 * then length, both little-endian u32. No half-close: vhost-device-vsock 0.3.0 ends a
 * connection whose host side shuts down its writing half.
 *   vtool serve PORT               listen; per connection: read a stream, answer crc+len (forks)
 *   vtool go PORT SECS             accept one connection within SECS (the host's "go")
 *   vtool conc PORT N BYTES        N connections to the host at once, BYTES each, all checked
 *   vtool put PORT BYTES CHUNK     one stream of BYTES in CHUNK writes; prints MiB/s
 *   vtool ping PORT COUNT          1-byte ping-pong; prints the median round trip in us
 *   vtool retry PORT SECS          connect + 4 checked bytes until it works; prints the wait
 *   vtool gen SEED BYTES           the pattern to stdout (host.py's is checked against it)
 * Lines for the host start with "QT: ". */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static uint32_t crc_table[256];
static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}
static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}
/* Byte i of stream s: cheap in C and in Python (bytes of a 64 KiB block, the block index
 * mixed into its first 4 bytes). */
static unsigned char block[65536];
static void block_init(uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (int i = 0; i < 65536; i++) { x ^= x << 13; x ^= x >> 17; x ^= x << 5; block[i] = x & 0xff; }
}
static void pat(uint64_t off, unsigned char *out, size_t n) {
    for (size_t k = 0; k < n; k++) {
        uint64_t i = off + k; uint32_t b = (uint32_t)(i >> 16); unsigned j = i & 0xffff;
        out[k] = j < 4 ? block[j] ^ (unsigned char)(b >> (8 * j)) : block[j];
    }
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static int vconnect(unsigned port) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) return -1;
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { int e = errno; close(s); errno = e; return -1; }
    return s;
}
static int vlisten(unsigned port) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 128) < 0) { perror("vsock listen"); exit(1); }
    return s;
}
static int write_all(int s, const unsigned char *p, size_t n) {
    while (n) { ssize_t w = write(s, p, n); if (w < 0) { if (errno == EINTR) continue; return -1; } p += w; n -= w; }
    return 0;
}
static int read_all(int s, unsigned char *p, size_t n) {
    while (n) { ssize_t r = read(s, p, n); if (r < 0 && errno == EINTR) continue; if (r <= 0) return -1; p += r; n -= r; }
    return 0;
}
/* Sends BYTES of stream SEED in CHUNK writes, checks the answer. 0: all good. */
static int send_checked(int s, uint32_t seed, uint64_t bytes, size_t chunk) {
    static unsigned char buf[1 << 20];
    if (chunk > sizeof buf) chunk = sizeof buf;
    block_init(seed);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(bytes >> (8 * i));
    if (write_all(s, len, 8) < 0) return 2;
    uint32_t crc = 0; uint64_t off = 0;
    while (off < bytes) {
        size_t n = bytes - off < chunk ? bytes - off : chunk;
        pat(off, buf, n); crc = crc_update(crc, buf, n);
        if (write_all(s, buf, n) < 0) return 2;
        off += n;
    }
    unsigned char ans[8];
    if (read_all(s, ans, 8) < 0) return 3;
    uint32_t c = ans[0] | ans[1] << 8 | ans[2] << 16 | (uint32_t)ans[3] << 24;
    uint32_t l = ans[4] | ans[5] << 8 | ans[6] << 16 | (uint32_t)ans[7] << 24;
    return c == crc && l == (uint32_t)bytes ? 0 : 4;
}
static void sum_service(int c) {
    static unsigned char buf[1 << 16];
    unsigned char len[8];
    if (read_all(c, len, 8) < 0) { close(c); return; }
    uint64_t want = 0;
    for (int i = 0; i < 8; i++) want |= (uint64_t)len[i] << (8 * i);
    uint32_t crc = 0; uint64_t got = 0; ssize_t r;
    while (got < want && (r = read(c, buf, want - got < sizeof buf ? want - got : sizeof buf)) > 0) { crc = crc_update(crc, buf, r); got += r; }
    uint32_t l = (uint32_t)got;
    unsigned char ans[8] = { crc, crc >> 8, crc >> 16, crc >> 24, l, l >> 8, l >> 16, l >> 24 };
    write_all(c, ans, 8);
    while (read(c, buf, sizeof buf) > 0) {}   /* the sender closes first */
    close(c);
}
static int cmp_d(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    crc_init();
    signal(SIGPIPE, SIG_IGN);
    if (argc < 3) { fprintf(stderr, "usage: see vtool.c\n"); return 2; }
    const char *cmd = argv[1]; unsigned port = strtoul(argv[2], 0, 10);
    if (!strcmp(cmd, "serve")) {
        int l = vlisten(port);
        signal(SIGCHLD, SIG_IGN);
        for (;;) {
            int c = accept(l, 0, 0);
            if (c < 0) { if (errno == EINTR) continue; perror("accept"); continue; }
            if (fork() == 0) { close(l); sum_service(c); _exit(0); }
            close(c);
        }
    }
    if (!strcmp(cmd, "gen") && argc >= 4) {
        uint64_t bytes = strtoull(argv[3], 0, 10), off = 0;
        static unsigned char buf[65536];
        block_init(port);
        while (off < bytes) {
            size_t n = bytes - off < sizeof buf ? bytes - off : sizeof buf;
            pat(off, buf, n); fwrite(buf, 1, n, stdout); off += n;
        }
        return 0;
    }
    if (!strcmp(cmd, "go") && argc >= 4) {
        int l = vlisten(port);
        struct pollfd p = { .fd = l, .events = POLLIN };
        if (poll(&p, 1, atoi(argv[3]) * 1000) <= 0) return 1;
        int c = accept(l, 0, 0);
        close(c); close(l);
        return c < 0;
    }
    if (!strcmp(cmd, "conc") && argc >= 5) {
        int n = atoi(argv[3]); uint64_t bytes = strtoull(argv[4], 0, 10);
        double t0 = now(); int ok = 0, fails[8] = { 0 };
        for (int i = 0; i < n; i++) {
            if (fork() == 0) {
                int s = vconnect(port);
                if (s < 0) _exit(1);
                _exit(send_checked(s, 100 + i, bytes, 65536));
            }
        }
        for (int i = 0; i < n; i++) {
            int st; if (wait(&st) < 0) break;
            int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 7;
            if (rc == 0) ok++; else fails[rc & 7]++;
        }
        printf("QT: vsock conc-g2h ok=%d/%d bytes=%llu secs=%.3f fails(connect,write,answer,mismatch)=%d,%d,%d,%d\n",
               ok, n, (unsigned long long)bytes, now() - t0, fails[1], fails[2], fails[3], fails[4]);
        return ok != n;
    }
    if (!strcmp(cmd, "put") && argc >= 5) {
        uint64_t bytes = strtoull(argv[3], 0, 10); size_t chunk = strtoul(argv[4], 0, 10);
        int s = vconnect(port);
        if (s < 0) { printf("QT: vsock put FAIL connect: %s\n", strerror(errno)); return 1; }
        double t0 = now(); int rc = send_checked(s, 7, bytes, chunk); double t = now() - t0;
        printf("QT: vsock put rc=%d bytes=%llu secs=%.3f mibs=%.2f\n", rc, (unsigned long long)bytes, t, bytes / t / 1048576);
        return rc;
    }
    if (!strcmp(cmd, "ping") && argc >= 4) {
        int n = atoi(argv[3]); int s = vconnect(port);
        if (s < 0 || n <= 0) { printf("QT: vsock ping FAIL connect: %s\n", strerror(errno)); return 1; }
        double *rt = calloc(n, sizeof *rt); unsigned char b = 0;
        for (int i = 0; i < n; i++) {
            unsigned char x = (unsigned char)i, y;
            double t0 = now();
            if (write_all(s, &x, 1) < 0 || read_all(s, &y, 1) < 0 || y != x) { printf("QT: vsock ping FAIL at %d\n", i); return 1; }
            rt[i] = now() - t0; b ^= y;
        }
        qsort(rt, n, sizeof *rt, cmp_d);
        printf("QT: vsock ping count=%d median_us=%.1f p10_us=%.1f p90_us=%.1f\n", n, rt[n / 2] * 1e6, rt[n / 10] * 1e6, rt[n * 9 / 10] * 1e6);
        close(s);
        return 0;
    }
    if (!strcmp(cmd, "retry") && argc >= 4) {
        double t0 = now(), limit = atof(argv[3]);
        while (now() - t0 < limit) {
            int s = vconnect(port);
            if (s >= 0) {
                struct timeval tv = { .tv_sec = 5 };
                setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
                int rc = send_checked(s, 9, 4096, 4096); close(s);
                if (rc == 0) { printf("QT: vsock retry ok after %.2fs\n", now() - t0); return 0; }
            }
            usleep(200000);
        }
        printf("QT: vsock retry FAIL for %.0fs: %s\n", limit, strerror(errno));
        return 1;
    }
    fprintf(stderr, "vtool: bad command\n");
    return 2;
}
