/* MPI peer of puma-coll-bench: the same measurements as puma-coll-rank, through MPI.
 * Usage: mpirun -n N coll_peer <ops> <max> <max_alltoall> <reps> <target_ms>
 *   ops = comma-separated list of barrier, bcast, allreduce, alltoall
 * Rank 0 prints "<op> <bytes> <min_us> <median_us> <max_us>" per operation and size
 * (the slowest rank's time per call). Sizes: 8, 64, 512, ... (x8) below the maximum, then the maximum.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void once(const char *op, long bytes, char *a, char *b, float *f, float *g, int p) {
    if (!strcmp(op, "barrier")) MPI_Barrier(MPI_COMM_WORLD);
    else if (!strcmp(op, "bcast")) MPI_Bcast(a, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD);
    else if (!strcmp(op, "allreduce"))
        MPI_Allreduce(f, g, (int)(bytes / 4), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    else if (!strcmp(op, "alltoall"))
        MPI_Alltoall(a, (int)bytes, MPI_BYTE, b, (int)bytes, MPI_BYTE, MPI_COMM_WORLD);
    (void)p;
}

static void measure(const char *op, long bytes, char *a, char *b, float *f, float *g, int p,
                    int reps, double target_ms, int rank) {
    /* The same calibration as puma-coll-rank: trial loops of 1, 2, 4 ... calls, doubling until
       one lasts a tenth of the target (at least 1 ms); rank 0 decides and broadcasts. */
    double target = target_ms / 1e3;
    double floor_s = target / 10.0 > 1e-3 ? target / 10.0 : 1e-3;
    /* A long enough loop decides only at no more than twice the previous loop's time per call
       (a disturbed first call set counts of 2-3 calls), or after 5 targets of trial loops. */
    int trial = 1, iters = 0;
    double prev = 0, total = 0; /* the first loop never decides on its own */
    for (;;) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int i = 0; i < trial; i++) once(op, bytes, a, b, f, g, p);
        double spent = MPI_Wtime() - t0;
        double one = spent / trial;
        total += spent;
        int steady = one <= 2.0 * prev || total >= 5.0 * target;
        prev = one;
        iters = 0;
        if (rank == 0 && ((spent >= floor_s && steady) || trial >= 20000)) {
            double it = target / (one > 1e-7 ? one : 1e-7);
            if (it < 2) it = 2;
            if (it > 20000) it = 20000;
            iters = (int)it;
        }
        MPI_Bcast(&iters, 1, MPI_INT, 0, MPI_COMM_WORLD);
        if (iters != 0) break;
        trial *= 2;
    }
    double *times = malloc(sizeof(double) * reps);
    for (int r = 0; r < reps; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double s = MPI_Wtime();
        for (int i = 0; i < iters; i++) once(op, bytes, a, b, f, g, p);
        double mine = (MPI_Wtime() - s) * 1e6 / iters;
        /* The slowest rank's time per call, as puma-coll-rank reports it (IMB's t_max). */
        MPI_Allreduce(&mine, &times[r], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    }
    qsort(times, reps, sizeof(double), cmp);
    if (rank == 0)
        printf("%s %ld %.3f %.3f %.3f\n", op, bytes, times[0], times[reps / 2], times[reps - 1]);
    fflush(stdout);
    free(times);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, p;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &p);
    if (argc < 6) {
        if (rank == 0) fprintf(stderr, "usage: coll_peer ops max max_alltoall reps target_ms\n");
        MPI_Finalize();
        return 2;
    }
    char ops[256];
    strncpy(ops, argv[1], sizeof ops - 1);
    ops[sizeof ops - 1] = 0;
    long max = atol(argv[2]), max_a2a = atol(argv[3]);
    int reps = atoi(argv[4]);
    double target = atof(argv[5]);
    long big = max > max_a2a * p ? max : max_a2a * p;
    char *a = calloc(big + 1, 1), *b = calloc(big + 1, 1);
    float *f = calloc(max / 4 + 1, sizeof(float)), *g = calloc(max / 4 + 1, sizeof(float));
    memset(a, 1, big);
    for (long i = 0; i < max / 4 + 1; i++) f[i] = 1.0f;
    for (char *op = strtok(ops, ","); op; op = strtok(NULL, ",")) {
        if (!strcmp(op, "barrier")) {
            measure(op, 0, a, b, f, g, p, reps, target, rank);
            continue;
        }
        long lim = strcmp(op, "alltoall") ? max : max_a2a;
        for (long s = 8; s < lim; s *= 8) measure(op, s, a, b, f, g, p, reps, target, rank);
        measure(op, lim, a, b, f, g, p, reps, target, rank);
    }
    MPI_Finalize();
    return 0;
}
