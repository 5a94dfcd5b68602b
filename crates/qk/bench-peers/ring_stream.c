/* A model of a stream over qk's ring, free of qk: how fast a sender can hand records to a
 * consumer on the other CPU, by record size (64 = one line per message, 32 = two messages a
 * line), by how many other stores the sender makes per message (qk's sender made about 40 in
 * all before the twenty-first round), and by how far ahead it asks for its ring lines with
 * prefetchw. Two processes, pinned to CPUs 0 and 1, share a 64 KiB ring of stamped records and an
 * ack word (a window of 64 messages, as puma-bench's rate). Each cycle first measures the
 * one-way time of a cache line between the two CPUs ("line"), since the machine's state moves.
 *
 * Build and run:  cc -O2 -o ring_stream ring_stream.c && ./ring_stream [SECONDS, default 1]
 * Prints one line per cycle: line ns, then size/stores/prefetch-distance and M msg/s.
 * See crates/qk/ROUNDS.md, twenty-first round.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CAP (64 * 1024)
#define WINDOW 64

static volatile uint64_t *ring, *ack, *ctl, *pong;
static uint64_t other_stores[512];

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s) != 0) {
        perror("ring_stream: sched_setaffinity (needs CPUs 0 and 1)");
        exit(1);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

#define AT(off) (&ring[((off) % CAP) / 8])

/* ctl[0]: command sequence (all ones = exit); ctl[1]: messages; ctl[2]: record bytes;
 * ctl[3]: 1 = line ping-pong instead of a stream. */
static void consumer(void) {
    pin(1);
    uint64_t pos = 0, seen = 0;
    for (;;) {
        uint64_t cmd;
        while ((cmd = __atomic_load_n(&ctl[0], __ATOMIC_ACQUIRE)) == seen)
            __builtin_ia32_pause();
        seen = cmd;
        if (cmd == ~0ull)
            return;
        long n = (long)ctl[1];
        uint64_t size = ctl[2];
        if (ctl[3] == 1) {
            for (long i = 0; i < n; i++) {
                while (__atomic_load_n(pong, __ATOMIC_ACQUIRE) != (uint64_t)(2 * i + 1))
                    __builtin_ia32_pause();
                __atomic_store_n(pong, 2 * i + 2, __ATOMIC_RELEASE);
            }
            continue;
        }
        uint64_t sum = 0;
        for (long got = 1; got <= n; got++) {
            volatile uint64_t *w = AT(pos);
            while (__atomic_load_n(w, __ATOMIC_ACQUIRE) != pos + 1)
                __builtin_ia32_pause();
            sum += w[1];
            pos += size;
            if (got % WINDOW == 0)
                __atomic_store_n(ack, (uint64_t)got, __ATOMIC_RELEASE);
        }
        if (sum == 42)
            putchar(' ');
    }
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 1;
    if (!(secs > 0)) {
        fprintf(stderr, "usage: ring_stream [SECONDS > 0]\n");
        return 2;
    }
    char *m = mmap(0, CAP + 8192, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("ring_stream: mmap");
        return 1;
    }
    ring = (void *)m;
    ack = (void *)(m + CAP + 64);
    ctl = (void *)(m + CAP + 256);
    pong = (void *)(m + CAP + 1024);
    pid_t pid = fork();
    if (pid < 0) {
        perror("ring_stream: fork");
        return 1;
    }
    if (pid == 0) {
        consumer();
        _exit(0);
    }
    pin(0);
    uint64_t pos = 0, seq = 0;
    const int sizes[] = {64, 32}, stores[] = {0, 16, 32}, ahead[] = {0, 8};
    double t0 = now();
    while (now() - t0 < secs) {
        const long pings = 20000;
        *pong = 0;
        ctl[1] = pings;
        ctl[3] = 1;
        __atomic_store_n(&ctl[0], ++seq, __ATOMIC_RELEASE);
        double a = now();
        for (long i = 0; i < pings; i++) {
            __atomic_store_n(pong, 2 * i + 1, __ATOMIC_RELEASE);
            while (__atomic_load_n(pong, __ATOMIC_ACQUIRE) != (uint64_t)(2 * i + 2))
                __builtin_ia32_pause();
        }
        printf("line %3.0f ns", (now() - a) / pings / 2 * 1e9);
        for (int si = 0; si < 2; si++)
            for (int wi = 0; wi < 3; wi++)
                for (int ai = 0; ai < 2; ai++) {
                    const long n = WINDOW * 2000;
                    uint64_t size = sizes[si];
                    int w = stores[wi], d = ahead[ai];
                    ctl[1] = n;
                    ctl[2] = size;
                    ctl[3] = 0;
                    *ack = 0;
                    __atomic_store_n(&ctl[0], ++seq, __ATOMIC_RELEASE);
                    double b = now();
                    for (long i = 0; i < n; i++) {
                        if (i % WINDOW == 0 && i)
                            while (__atomic_load_n(ack, __ATOMIC_ACQUIRE) < (uint64_t)i)
                                __builtin_ia32_pause();
                        volatile uint64_t *r = AT(pos);
                        for (uint64_t k = 1; k < size / 8; k++)
                            r[k] = (uint64_t)i;
                        __atomic_store_n(r, pos + 1, __ATOMIC_RELEASE);
                        pos += size;
                        for (int k = 0; k < w; k++)
                            ((volatile uint64_t *)other_stores)[(i * w + k) % 512] = (uint64_t)i;
                        if (d && i % WINDOW != 0)
                            __builtin_prefetch((const void *)AT(pos + 64 * (uint64_t)d), 1, 3);
                    }
                    while (__atomic_load_n(ack, __ATOMIC_ACQUIRE) < (uint64_t)n)
                        __builtin_ia32_pause();
                    printf("  %d/%d/%d %5.1f", (int)size, w, d, n / (now() - b) / 1e6);
                }
        printf("\n");
        fflush(stdout);
    }
    __atomic_store_n(&ctl[0], ~0ull, __ATOMIC_RELEASE);
    waitpid(pid, 0, 0);
    return 0;
}
