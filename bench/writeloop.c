/* Hot-path microbenchmark for `cargo xtask bench`.
 *
 *   writeloop write|getppid|unixpair ITERATIONS REPS
 *
 * Runs one warm-up repetition, then REPS timed repetitions of ITERATIONS
 * syscalls each, and prints one line per repetition: nanoseconds per call
 * in thread CPU time (CLOCK_THREAD_CPUTIME_ID: time the loop was preempted
 * by other tasks does not count; BPF programs run in the caller's context
 * and do), then in wall-clock time.
 * `write` is write(fd, 1 byte) to /dev/null: the syscall sigwake hooks on
 * every thread of the host. `getppid` is an unrelated syscall: it pays only
 * the generic cost of having any syscall tracepoint enabled. `unixpair` is
 * one 1-byte send(2) and one recv(2) on an AF_UNIX socketpair per
 * iteration: what an event loop's own wakeup costs, and the path a
 * socket-send hook would put its programs on. The caller pins it to one CPU
 * (taskset). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s write|getppid|unixpair ITERATIONS REPS\n", argv[0]);
        return 2;
    }
    int do_write = strcmp(argv[1], "write") == 0;
    int do_pair = strcmp(argv[1], "unixpair") == 0;
    if (!do_write && !do_pair && strcmp(argv[1], "getppid") != 0) {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    long iters = atol(argv[2]);
    int reps = atoi(argv[3]);
    if (iters <= 0 || reps <= 0) return 2;
    int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        perror("open /dev/null");
        return 1;
    }
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
        perror("socketpair");
        return 1;
    }
    char byte = 'x';
    volatile long sink = 0;
    for (int rep = 0; rep <= reps; rep++) {
        double c0 = now_ns(CLOCK_THREAD_CPUTIME_ID), t0 = now_ns(CLOCK_MONOTONIC);
        if (do_write) {
            for (long i = 0; i < iters; i++) {
                if (write(fd, &byte, 1) != 1) {
                    perror("write");
                    return 1;
                }
            }
        } else if (do_pair) {
            for (long i = 0; i < iters; i++) {
                if (send(pair[0], &byte, 1, 0) != 1 || recv(pair[1], &byte, 1, 0) != 1) {
                    perror("send/recv");
                    return 1;
                }
            }
        } else {
            for (long i = 0; i < iters; i++) sink += getppid();
        }
        double c1 = now_ns(CLOCK_THREAD_CPUTIME_ID), t1 = now_ns(CLOCK_MONOTONIC);
        if (rep > 0) printf("%.3f %.3f\n", (c1 - c0) / (double)iters, (t1 - t0) / (double)iters);
    }
    (void)sink;
    return 0;
}
