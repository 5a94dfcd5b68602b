/* Does prefetchw take a cache line away from the other CPU on this machine? CPU 1 writes 64
 * lines (a pointer chain); CPU 0 then does nothing, a prefetchw of each line, or a load of each;
 * then CPU 1 walks its chain again, each load depending on the one before, and the cycles per
 * line tell where its lines are: in its own L1 (a few cycles), in its own L2 (≈ 20), or taken by
 * CPU 0 (a transfer between the cores, ≈ 100 cycles and more). If prefetchw took ownership, the
 * walk after it would cost a transfer per line.
 *
 * Build and run:  cc -O2 -o prefetchw_probe prefetchw_probe.c -lpthread && ./prefetchw_probe
 * See crates/qk/ROUNDS.md, twenty-first round.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <x86intrin.h>

#define LINES 64
#define ROUNDS 30

static _Alignas(64) volatile uint64_t lines[LINES * 8];
static volatile int phase;

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (pthread_setaffinity_np(pthread_self(), sizeof s, &s) != 0) {
        fprintf(stderr, "prefetchw_probe: cannot pin to CPU %d (needs CPUs 0 and 1)\n", cpu);
        exit(1);
    }
}

static void spin(int n) {
    for (volatile int d = 0; d < n; d++) {
    }
}

/* CPU 0: on its turn, nothing / prefetchw / load on every line, then hand back. */
static void *cpu0(void *arg) {
    (void)arg;
    pin(0);
    for (int r = 0; r < ROUNDS; r++) {
        while (__atomic_load_n(&phase, __ATOMIC_ACQUIRE) != 2 * r + 1)
            ;
        int mode = r % 3;
        for (int i = 0; i < LINES; i++) {
            if (mode == 1)
                __builtin_prefetch((const void *)&lines[i * 8], 1, 3);
            if (mode == 2)
                (void)lines[i * 8];
        }
        spin(20000);
        __atomic_store_n(&phase, 2 * r + 2, __ATOMIC_RELEASE);
    }
    return 0;
}

int main(void) {
    pthread_t t;
    if (pthread_create(&t, 0, cpu0, 0) != 0) {
        perror("prefetchw_probe: pthread_create");
        return 1;
    }
    pin(1);
    double cycles[3] = {0};
    int n[3] = {0};
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < LINES; i++)
            lines[i * 8] = (uint64_t)((i * 7 + 1) % LINES);
        _mm_mfence();
        __atomic_store_n(&phase, 2 * r + 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(&phase, __ATOMIC_ACQUIRE) != 2 * r + 2)
            ;
        spin(20000);
        unsigned aux;
        uint64_t at = 0, t0 = __rdtscp(&aux);
        for (int i = 0; i < LINES; i++)
            at = lines[at * 8];
        uint64_t t1 = __rdtscp(&aux);
        if (at == 12345)
            putchar(' ');
        cycles[r % 3] += (double)(t1 - t0) / LINES;
        n[r % 3]++;
    }
    pthread_join(t, 0);
    printf("CPU 1 rereading its own lines after CPU 0 did: nothing %.1f, prefetchw %.1f, a load "
           "%.1f cycles/line\n",
           cycles[0] / n[0], cycles[1] / n[1], cycles[2] / n[2]);
    return 0;
}
