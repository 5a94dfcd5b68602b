/* The floor of a small message over TCP between two network namespaces: two plain processes, one
 * per namespace and CPU, bounce N bytes over one TCP_NODELAY connection, each polling its socket
 * with non-blocking receives (the way a busy-polling MPI rank does). No fabric, no portals, no
 * engine: what is left is the kernel's TCP and veth path. Prints one line per repeat:
 * "floor SIZE ONE_WAY_US" (half the mean round trip).
 *
 * usage: tcp_floor server|client IPV4 CPU SIZE ITERS REPEATS
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PORT 7111
#define MAX_SIZE 65536

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void die(const char *what) {
    fprintf(stderr, "tcp_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void recv_all(int fd, char *buf, int n) {
    int got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (int)r;
        } else if (r == 0) {
            fprintf(stderr, "tcp_floor: peer closed the connection\n");
            exit(1);
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            die("recv");
        }
    }
}

static void send_all(int fd, const char *buf, int n) {
    int put = 0;
    while (put < n) {
        ssize_t r = send(fd, buf + put, n - put, 0);
        if (r > 0)
            put += (int)r;
        else if (errno != EINTR)
            die("send");
    }
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: tcp_floor server|client IPV4 CPU SIZE ITERS REPEATS\n");
        return 2;
    }
    int server = strcmp(argv[1], "server") == 0;
    int cpu = atoi(argv[3]), size = atoi(argv[4]), iters = atoi(argv[5]), reps = atoi(argv[6]);
    if (size < 1 || size > MAX_SIZE || iters < 1 || reps < 1) {
        fprintf(stderr, "tcp_floor: SIZE must be 1..%d, ITERS and REPEATS at least 1\n", MAX_SIZE);
        return 2;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        die("sched_setaffinity");
    static char buf[MAX_SIZE];
    int one = 1, fd = -1;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(PORT);
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1) {
        fprintf(stderr, "tcp_floor: %s is not an IPv4 address\n", argv[2]);
        return 2;
    }
    if (server) {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        if (l < 0)
            die("socket");
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l, (struct sockaddr *)&addr, sizeof addr) != 0)
            die("bind");
        if (listen(l, 1) != 0)
            die("listen");
        fd = accept(l, NULL, NULL);
        if (fd < 0)
            die("accept");
        close(l);
    } else {
        for (int k = 0; k < 250; k++) {
            fd = socket(AF_INET, SOCK_STREAM, 0);
            if (fd < 0)
                die("socket");
            if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
                break;
            close(fd);
            fd = -1;
            usleep(20000);
        }
        if (fd < 0)
            die("connect (5 s)");
    }
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
        die("TCP_NODELAY");
    for (int r = 0; r < reps; r++) {
        double t0 = now_us();
        for (int i = 0; i < iters; i++) {
            if (server) {
                recv_all(fd, buf, size);
                send_all(fd, buf, size);
            } else {
                send_all(fd, buf, size);
                recv_all(fd, buf, size);
            }
        }
        double t1 = now_us();
        if (!server)
            printf("floor %d %.3f\n", size, (t1 - t0) / iters / 2);
    }
    close(fd);
    return 0;
}
