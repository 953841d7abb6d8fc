/* Dropped-wakeup generator for `cargo xtask bench` (detection latency).
 *
 *   dropper spaced N GAP_US   wait for a line on stdin, then N drops GAP_US apart
 *   dropper burst N           wait for a line on stdin, then N drops back to back
 *   dropper step              one drop per line read on stdin
 *
 * A "drop" is what a starved event loop suffers: a SIGUSR1 handler (installed
 * with sigaction, like CPython's) write()s one byte to its wakeup fd, a
 * non-blocking socketpair that is already full (the wakeup of trio, asyncio,
 * uvloop, tornado and tokio, which every hook tier sees), and the write
 * fails with EAGAIN.
 * The handler reads CLOCK_MONOTONIC right before the write; the program
 * prints that timestamp (ns) for every drop, one per line: in `step` mode
 * right away, otherwise all at the end. It exits 1 if a handler write did
 * not fail with EAGAIN. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int wakeup_fd = -1;
static volatile long long handler_ts;
static volatile int handler_ret, handler_errno;

static void on_usr1(int sig) {
    (void)sig;
    int saved = errno;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    handler_ts = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    handler_ret = (int)write(wakeup_fd, "\n", 1);
    handler_errno = errno;
    errno = saved;
}

static long long one_drop(void) {
    handler_ret = 0;
    /* A thread-directed signal to ourselves is delivered on the way out of
     * this syscall: the handler has run when raise() returns. */
    raise(SIGUSR1);
    if (handler_ret != -1 || handler_errno != EAGAIN) {
        fprintf(stderr, "dropper: handler write returned %d (errno %d), expected EAGAIN\n", handler_ret,
                handler_errno);
        exit(1);
    }
    return handler_ts;
}

static void wait_line(void) {
    char buf[64];
    if (!fgets(buf, sizeof buf, stdin)) exit(0);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s spaced N GAP_US | burst N | step\n", argv[0]);
        return 2;
    }
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) {
        perror("socketpair");
        return 1;
    }
    int small = 1; /* the kernel rounds it up to its minimum */
    setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    wakeup_fd = fds[0];
    static char chunk[65536];
    memset(chunk, 'x', sizeof chunk);
    while (write(wakeup_fd, chunk, sizeof chunk) > 0) {}
    while (write(wakeup_fd, chunk, 1) > 0) {}
    if (errno != EAGAIN) {
        perror("filling the socket");
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0) {
        perror("sigaction");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());

    if (strcmp(argv[1], "step") == 0) {
        char buf[64];
        while (fgets(buf, sizeof buf, stdin)) printf("%lld\n", one_drop());
        return 0;
    }
    long n = argc > 2 ? atol(argv[2]) : 0;
    long gap_us = argc > 3 ? atol(argv[3]) : 0;
    if (n <= 0 || n > 10000000) return 2;
    long long *ts = calloc((size_t)n, sizeof *ts);
    if (!ts) return 1;
    wait_line();
    struct timespec gap = {gap_us / 1000000, (gap_us % 1000000) * 1000};
    for (long i = 0; i < n; i++) {
        ts[i] = one_drop();
        if (gap_us > 0) nanosleep(&gap, NULL);
    }
    for (long i = 0; i < n; i++) printf("%lld\n", ts[i]);
    return 0;
}
