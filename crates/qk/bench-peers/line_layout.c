/* Where a ping-pong's messages live, and what it costs: a model free of qk.
 *
 * Two threads pinned to CPUs 0 and 1 bounce 32-byte stamped records (stamp written last):
 *   two     one ring per direction (qk's layout): each side writes its own ring and polls the
 *           other's, moving to the next 32-byte slot every message (64 KiB rings);
 *   two-pw  the same, and the receiver asks for the line its answer will go to with prefetchw as
 *           soon as it sees a record (qk's hint, eighteenth round);
 *   shared  both directions in one 64-byte line, used over and over (half a line each way).
 * Between taking a record and answering it each side spins WORK iterations of a dependent loop,
 * standing for the library's delivery work (the loop's time alone is printed as "work ns").
 *
 * Build and run:  cc -O2 -mprfchw -pthread -o line_layout line_layout.c
 *                 ./line_layout [ROUND_TRIPS, default 500000] [WORK, default 0]
 * Prints one line: work ns, then the one-way ns (half a round trip) of each layout.
 * See crates/qk/ROUNDS.md, twenty-fifth round.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <x86intrin.h>

#define CAP (64 * 1024)
#define SLOT 32

enum layout { TWO, TWO_PW, SHARED };

static volatile uint64_t *ring[2]; /* ring[d]: records written by thread d */
static volatile uint64_t *line;    /* the shared line: thread d writes half d */
static long trips, work;
static enum layout lay;
static double one_way;

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void spin_work(void) {
    for (volatile long w = 0; w < work; w++) {
    }
}

/* The slot record number `seq` written by thread `d` lives in. */
static volatile uint64_t *slot(int d, uint64_t seq) {
    if (lay == SHARED)
        return line + 4 * d;
    return ring[d] + ((seq * SLOT) % CAP) / 8;
}

static void put(int me, uint64_t seq) {
    volatile uint64_t *p = slot(me, seq);
    p[1] = seq;
    p[2] = 1;
    p[3] = 0;
    p[0] = seq + 1; /* the stamp, last */
}

static void take(int me, uint64_t seq) {
    volatile uint64_t *p = slot(1 - me, seq);
    while (p[0] != seq + 1) {
    }
    if (lay == TWO_PW)
        _m_prefetchw((void *)slot(me, seq + (me == 0)));
    spin_work();
}

static void *side(void *arg) {
    int me = (int)(long)arg;
    pin(me);
    long warm = trips / 10;
    double t0 = 0;
    for (long i = 0; i < trips + warm; i++) {
        if (i == warm)
            t0 = now_ns();
        if (me == 0) {
            put(0, i);
            take(0, i);
        } else {
            take(1, i);
            put(1, i);
        }
    }
    if (me == 0)
        one_way = (now_ns() - t0) / trips / 2;
    return 0;
}

static double run(enum layout l) {
    lay = l;
    for (int d = 0; d < 2; d++)
        for (int j = 0; j < CAP / 8; j++)
            ring[d][j] = 0;
    for (int j = 0; j < 8; j++)
        line[j] = 0;
    pthread_t t[2];
    for (long i = 0; i < 2; i++) {
        /* Each thread starts on its own CPU: started on its creator's and spinning at a
         * real-time priority (chrt -f), one side would keep the other from ever moving. */
        pthread_attr_t a;
        cpu_set_t s;
        CPU_ZERO(&s);
        CPU_SET(i, &s);
        pthread_attr_init(&a);
        pthread_attr_setaffinity_np(&a, sizeof s, &s);
        pthread_create(&t[i], &a, side, (void *)i);
        pthread_attr_destroy(&a);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], 0);
    return one_way;
}

int main(int argc, char **argv) {
    trips = argc > 1 ? atol(argv[1]) : 500000;
    work = argc > 2 ? atol(argv[2]) : 0;
    if (trips < 10 || work < 0) {
        fprintf(stderr, "usage: %s [ROUND_TRIPS >= 10] [WORK >= 0]\n", argv[0]);
        return 2;
    }
    for (int d = 0; d < 2; d++)
        ring[d] = aligned_alloc(4096, CAP);
    line = aligned_alloc(64, 64);
    pin(0);
    double t0 = now_ns();
    for (int i = 0; i < 10000; i++)
        spin_work();
    double work_ns = (now_ns() - t0) / 10000;
    double two = run(TWO), two_pw = run(TWO_PW), shared = run(SHARED);
    printf("work %.1f ns | one-way ns: two %.1f  two-pw %.1f  shared %.1f\n", work_ns, two, two_pw,
           shared);
    return 0;
}
