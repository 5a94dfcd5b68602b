/* MPI peer of puma-bench: the same measurements as puma-bench's own ranks, through MPI.
 * Usage: mpirun -n 2 mpi_peer <what> <size> <iters> [window [rewrite]]
 *   what = lat   ping-pong, prints one-way latency in ns
 *        = bw    streaming `window` messages per round, prints bytes per second
 *        = rate  streaming 8-byte messages, prints messages per second
 *   rewrite      before each send (lat: both ranks; bw/rate: the sender, once per window, as
 *                a buffer must not change while a send from it is in flight) write one byte in
 *                every 64-byte line of the message, as an application producing new data would
 * Output (rank 0): a single line "<what> <size> <value>", with " rewrite" appended when asked.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One new byte in every 64-byte line of the first `size` bytes of `buf`. */
static void rewrite_lines(char *buf, long size) {
    for (long i = 0; i < size; i += 64) buf[i]++;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    int rewrite = argc > 5 && !strcmp(argv[5], "rewrite");
    if (argc < 4 || argc > 6 || (argc > 5 && !rewrite)) {
        if (rank == 0) fprintf(stderr, "usage: mpi_peer lat|bw|rate size iters [window [rewrite]]\n");
        MPI_Finalize();
        return 2;
    }
    const char *what = argv[1];
    long size = atol(argv[2]);
    long iters = atol(argv[3]);
    int window = argc > 4 ? atoi(argv[4]) : 64;
    /* One buffer reused by every message, as puma-bench does on our side (its ping-pong, too,
     * sends back the bytes it received, from the one buffer). */
    char *buf = malloc(size > 0 ? (size_t)size : 1);
    memset(buf, 1, size > 0 ? size : 1);
    MPI_Request *req = malloc(sizeof(MPI_Request) * (window + 1));
    int peer = 1 - rank;
    long warm = iters / 10 + 1;
    const char *mark = rewrite ? " rewrite" : "";
    double t0 = 0;
    if (!strcmp(what, "lat")) {
        for (long i = 0; i < iters + warm; i++) {
            if (i == warm) { MPI_Barrier(MPI_COMM_WORLD); t0 = MPI_Wtime(); }
            if (rank == 0) {
                if (rewrite) rewrite_lines(buf, size);
                MPI_Send(buf, size, MPI_BYTE, peer, 1, MPI_COMM_WORLD);
                MPI_Recv(buf, size, MPI_BYTE, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else {
                MPI_Recv(buf, size, MPI_BYTE, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                if (rewrite) rewrite_lines(buf, size);
                MPI_Send(buf, size, MPI_BYTE, peer, 1, MPI_COMM_WORLD);
            }
        }
        double t = MPI_Wtime() - t0;
        if (rank == 0) printf("lat %ld %.1f%s\n", size, t / iters / 2 * 1e9, mark);
    } else {
        char ack = 0;
        for (long i = 0; i < iters + warm; i++) {
            if (i == warm) { MPI_Barrier(MPI_COMM_WORLD); t0 = MPI_Wtime(); }
            /* The last window's sends are complete (answered); this window's are not yet posted. */
            if (rewrite && rank == 0) rewrite_lines(buf, size);
            for (int w = 0; w < window; w++) {
                if (rank == 0) MPI_Isend(buf, size, MPI_BYTE, peer, 2, MPI_COMM_WORLD, &req[w]);
                else MPI_Irecv(buf, size, MPI_BYTE, peer, 2, MPI_COMM_WORLD, &req[w]);
            }
            MPI_Waitall(window, req, MPI_STATUSES_IGNORE);
            if (rank == 0) MPI_Recv(&ack, 0, MPI_BYTE, peer, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            else MPI_Send(&ack, 0, MPI_BYTE, peer, 3, MPI_COMM_WORLD);
        }
        double t = MPI_Wtime() - t0;
        double msgs = (double)iters * window;
        if (rank == 0) {
            if (!strcmp(what, "bw")) printf("bw %ld %.1f%s\n", size, msgs * size / t, mark);
            else printf("rate %ld %.1f%s\n", size, msgs / t, mark);
        }
    }
    free(req);
    free(buf);
    MPI_Finalize();
    return 0;
}
