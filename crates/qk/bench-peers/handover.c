/* What it costs here to hand the CPU from one thread to another: two threads pinned to one CPU
 * take turns 200 000 times each, waiting either in a futex (the waker wakes it) or by yielding.
 * This is the price of each rank <-> node-engine hand-over on a TCP hop when both share a CPU.
 *
 * build and run: cc -O2 -pthread -o handover handover.c && ./handover futex && ./handover yield
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TURNS 200000

static _Atomic int turn;
static int use_futex;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *player(void *arg) {
    int me = (int)(long)arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        perror("handover: sched_setaffinity");
        return NULL;
    }
    for (int i = 0; i < TURNS; i++) {
        while (atomic_load(&turn) != me) {
            if (use_futex)
                syscall(SYS_futex, &turn, FUTEX_WAIT_PRIVATE, !me, NULL, NULL, 0);
            else
                sched_yield();
        }
        atomic_store(&turn, !me);
        if (use_futex)
            syscall(SYS_futex, &turn, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2 || (strcmp(argv[1], "futex") != 0 && strcmp(argv[1], "yield") != 0)) {
        fprintf(stderr, "usage: handover futex|yield\n");
        return 2;
    }
    use_futex = strcmp(argv[1], "futex") == 0;
    pthread_t a, b;
    double t0 = now_us();
    if (pthread_create(&a, NULL, player, (void *)0L) != 0 ||
        pthread_create(&b, NULL, player, (void *)1L) != 0) {
        perror("handover: pthread_create");
        return 1;
    }
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("%s: %.2f us per hand-over\n", argv[1], (now_us() - t0) / TURNS / 2);
    return 0;
}
