/*
 * memwriter: ground truth for dirty-page tracking tests (runs inside the test guest).
 *
 * Allocates N MiB of anonymous memory, fills every page with pseudo-random bytes, then in rounds
 * changes K distinct pseudo-random pages (8 bytes at a random offset, XORed so the page content
 * always changes) and prints, as one JSON object per line on stdout, which page indices it wrote.
 * A dirty tracker (soft-dirty inside the guest, memfd hashing on the host, ...) is then checked
 * against that list.
 *
 *   memwriter [-m MiB] [-r rounds] [-n pages] [-s seed] [-i ms] [-w] [-d] [-p] [-H]
 *     -m  region size in MiB (default 16)
 *     -r  number of write rounds (default 4)
 *     -n  distinct pages written per round (default 8)
 *     -s  PRNG seed (default 1): same seed, same pages
 *     -i  sleep this many milliseconds after each round (default 0)
 *     -w  step mode: read one line from stdin before each round (EOF ends early)
 *     -d  soft-dirty self check: clear_refs before each round, report the region's
 *         soft-dirty pages after it ("soft_dirty"); needs CONFIG_MEM_SOFT_DIRTY
 *     -p  report page frame numbers (guest-physical address = pfn * 4096) from
 *         /proc/self/pagemap: all region pages in "ready", written pages in each "round"
 *     -H  hold: after the last round print "done" and keep the region until a signal
 *
 * Output (one line each, flushed):
 *   {"event":"ready","pid":P,"addr":"0x...","size_mib":M,"pages":N,"page_size":4096,"seed":S[,"pfns":[...]]}
 *   {"event":"round","round":R,"pages":[...][,"pfns":[...]][,"soft_dirty":[...]]}
 *   {"event":"done","rounds":R}
 * Errors go to stderr with exit status 2 (usage) or 1 (system call failed).
 *
 * The region is mlock()ed (no swap) and madvise(MADV_NOHUGEPAGE)d, so soft-dirty and pagemap
 * work at 4 KiB granularity. Build: gcc -static -O2 -o memwriter memwriter.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define PM_SOFT_DIRTY (1ULL << 55)
#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)

static uint64_t rng_state;

static uint64_t rng_next(void) {
    /* xorshift64* */
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void die(const char *what) {
    fprintf(stderr, "memwriter: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: memwriter [-m MiB] [-r rounds] [-n pages] [-s seed] [-i ms] [-w] [-d] [-p] [-H]\n");
    exit(2);
}

static unsigned long parse_ul(const char *s) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || *s == '\0' || *end != '\0') usage();
    return v;
}

static void clear_soft_dirty(void) {
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0) die("open /proc/self/clear_refs");
    if (write(fd, "4", 1) != 1) die("write /proc/self/clear_refs");
    close(fd);
}

/* Read the pagemap entries of npages pages starting at addr. */
static void read_pagemap(int fd, const unsigned char *addr, size_t npages, uint64_t *out) {
    off_t off = (off_t)((uintptr_t)addr / PAGE) * 8;
    size_t want = npages * 8, got = 0;
    while (got < want) {
        ssize_t n = pread(fd, (char *)out + got, want - got, off + (off_t)got);
        if (n <= 0) die("read /proc/self/pagemap");
        got += (size_t)n;
    }
}

static void print_list(const char *key, const uint64_t *v, size_t n) {
    printf(",\"%s\":[", key);
    for (size_t i = 0; i < n; i++) printf(i ? ",%llu" : "%llu", (unsigned long long)v[i]);
    printf("]");
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    unsigned long mib = 16, rounds = 4, per_round = 8, seed = 1, interval_ms = 0;
    int step = 0, soft_dirty = 0, pfns = 0, hold = 0, c;
    while ((c = getopt(argc, argv, "m:r:n:s:i:wdpH")) != -1) {
        switch (c) {
        case 'm': mib = parse_ul(optarg); break;
        case 'r': rounds = parse_ul(optarg); break;
        case 'n': per_round = parse_ul(optarg); break;
        case 's': seed = parse_ul(optarg); break;
        case 'i': interval_ms = parse_ul(optarg); break;
        case 'w': step = 1; break;
        case 'd': soft_dirty = 1; break;
        case 'p': pfns = 1; break;
        case 'H': hold = 1; break;
        default: usage();
        }
    }
    if (optind != argc || mib == 0) usage();
    size_t size = mib << 20, npages = size / PAGE;
    if (per_round > npages) {
        fprintf(stderr, "memwriter: -n %lu exceeds the region's %zu pages\n", per_round, npages);
        return 2;
    }
    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;

    unsigned char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    madvise(mem, size, MADV_NOHUGEPAGE); /* best effort: 4 KiB soft-dirty granularity */
    for (size_t off = 0; off < size; off += 8) {
        uint64_t r = rng_next();
        memcpy(mem + off, &r, 8);
    }
    if (mlock(mem, size) != 0 && errno != EPERM && errno != ENOMEM) die("mlock");

    int pm = -1;
    uint64_t *entries = NULL;
    if (pfns || soft_dirty) {
        pm = open("/proc/self/pagemap", O_RDONLY);
        if (pm < 0) die("open /proc/self/pagemap");
        entries = malloc(npages * sizeof *entries);
        if (!entries) die("malloc");
    }
    uint64_t *written = malloc(per_round * sizeof *written);
    uint64_t *list = malloc((npages > per_round ? npages : per_round) * sizeof *list);
    unsigned char *taken = calloc(npages, 1);
    if (!written || !list || !taken) die("malloc");

    printf("{\"event\":\"ready\",\"pid\":%d,\"addr\":\"%p\",\"size_mib\":%lu,\"pages\":%zu,"
           "\"page_size\":%lu,\"seed\":%lu",
           (int)getpid(), (void *)mem, mib, npages, PAGE, seed);
    if (pfns) {
        read_pagemap(pm, mem, npages, entries);
        for (size_t i = 0; i < npages; i++) list[i] = entries[i] & PM_PFN_MASK;
        print_list("pfns", list, npages);
    }
    printf("}\n");
    fflush(stdout);

    unsigned long r;
    for (r = 1; r <= rounds; r++) {
        if (step) {
            int ch;
            while ((ch = getchar()) != EOF && ch != '\n') {}
            if (ch == EOF) break;
        }
        if (soft_dirty) clear_soft_dirty();
        memset(taken, 0, npages);
        for (unsigned long k = 0; k < per_round; k++) {
            uint64_t p;
            do p = rng_next() % npages; while (taken[p]);
            taken[p] = 1;
            written[k] = p;
            size_t off = p * PAGE + (rng_next() % (PAGE / 8)) * 8;
            uint64_t v;
            memcpy(&v, mem + off, 8);
            v ^= rng_next() | 1; /* never a no-op */
            memcpy(mem + off, &v, 8);
        }
        qsort(written, per_round, sizeof *written, cmp_u64);
        printf("{\"event\":\"round\",\"round\":%lu", r);
        print_list("pages", written, per_round);
        if (pfns || soft_dirty) read_pagemap(pm, mem, npages, entries);
        if (pfns) {
            for (unsigned long k = 0; k < per_round; k++) list[k] = entries[written[k]] & PM_PFN_MASK;
            print_list("pfns", list, per_round);
        }
        if (soft_dirty) {
            size_t n = 0;
            for (size_t i = 0; i < npages; i++)
                if ((entries[i] & PM_SOFT_DIRTY) && (entries[i] & PM_PRESENT)) list[n++] = i;
            print_list("soft_dirty", list, n);
        }
        printf("}\n");
        fflush(stdout);
        if (interval_ms) {
            struct timespec ts = {(time_t)(interval_ms / 1000), (long)(interval_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    printf("{\"event\":\"done\",\"rounds\":%lu}\n", r - 1);
    fflush(stdout);
    if (hold)
        for (;;) pause();
    return 0;
}
