/* What it costs here to hand the CPU from one thread to another: two threads pinned to one CPU
 * take turns 200 000 times each, waiting either in a futex (the waker wakes it) or by yielding.
 * This is the price of each rank <-> node-engine hand-over on a TCP hop when both share a CPU.
 * `pfutex` / `pyield` do the same between two processes (a shared mapping, a shared futex): the
 * rank and its node engine are two processes, so each hand-over also switches address spaces.
 *
 * build and run: cc -O2 -pthread -o handover handover.c && ./handover futex && ./handover yield
 *                && ./handover pfutex && ./handover pyield
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TURNS 200000

static _Atomic int turn_local;
static _Atomic int *turn = &turn_local;
static int use_futex;
static int wait_op = FUTEX_WAIT_PRIVATE, wake_op = FUTEX_WAKE_PRIVATE;

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
        while (atomic_load(turn) != me) {
            if (use_futex)
                syscall(SYS_futex, turn, wait_op, !me, NULL, NULL, 0);
            else
                sched_yield();
        }
        atomic_store(turn, !me);
        if (use_futex)
            syscall(SYS_futex, turn, wake_op, 1, NULL, NULL, 0);
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *m = argc == 2 ? argv[1] : "";
    int procs = strcmp(m, "pfutex") == 0 || strcmp(m, "pyield") == 0;
    if (!procs && strcmp(m, "futex") != 0 && strcmp(m, "yield") != 0) {
        fprintf(stderr, "usage: handover futex|yield|pfutex|pyield\n");
        return 2;
    }
    use_futex = strcmp(m, "futex") == 0 || strcmp(m, "pfutex") == 0;
    if (procs) {
        turn = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (turn == MAP_FAILED) {
            perror("handover: mmap");
            return 1;
        }
        wait_op = FUTEX_WAIT;
        wake_op = FUTEX_WAKE;
        double t0 = now_us();
        pid_t kid = fork();
        if (kid < 0) {
            perror("handover: fork");
            return 1;
        }
        player((void *)(long)(kid == 0));
        if (kid == 0)
            _exit(0);
        waitpid(kid, NULL, 0);
        printf("%s: %.2f us per hand-over\n", m, (now_us() - t0) / TURNS / 2);
        return 0;
    }
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
