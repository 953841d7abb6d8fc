/* Signal storm for `cargo xtask bench`.
 *
 *   storm RECEIVERS SENDERS SECONDS
 *
 * Forks RECEIVERS processes with a SIGUSR1 handler (they count what they
 * handle in shared memory) and SENDERS processes that kill(SIGUSR1) them
 * round-robin as fast as they can for SECONDS. Standard signals merge while
 * pending, so handled <= sent. Prints one line:
 *   sent=N handled=N seconds=F
 * Everything it forks is in its own process group; the caller kills the
 * group if it has to. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 256

struct shared {
    volatile long handled[MAX_PROCS];
    volatile long sent[MAX_PROCS];
    volatile int go;
    volatile int ready;
};

static struct shared *sh;
static int my_slot;

static void on_usr1(int sig) {
    (void)sig;
    sh->handled[my_slot]++;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s RECEIVERS SENDERS SECONDS\n", argv[0]);
        return 2;
    }
    int nrecv = atoi(argv[1]), nsend = atoi(argv[2]);
    double seconds = atof(argv[3]);
    if (nrecv < 1 || nsend < 1 || nrecv > MAX_PROCS || nsend > MAX_PROCS || seconds <= 0) return 2;
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memset((void *)sh, 0, sizeof *sh);
    pid_t recv[MAX_PROCS], send[MAX_PROCS];

    for (int i = 0; i < nrecv; i++) {
        pid_t p = fork();
        if (p < 0) {
            perror("fork");
            kill(0, SIGKILL);
        }
        if (p == 0) {
            my_slot = i;
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = on_usr1;
            sa.sa_flags = SA_RESTART;
            sigemptyset(&sa.sa_mask);
            sigaction(SIGUSR1, &sa, NULL);
            __sync_fetch_and_add(&sh->ready, 1);
            for (;;) pause();
        }
        recv[i] = p;
    }
    while (sh->ready < nrecv) usleep(1000);

    for (int i = 0; i < nsend; i++) {
        pid_t p = fork();
        if (p < 0) {
            perror("fork");
            kill(0, SIGKILL);
        }
        if (p == 0) {
            while (!sh->go) usleep(100);
            double end = now_s() + seconds;
            long n = 0;
            int r = i % nrecv;
            for (;;) {
                for (int k = 0; k < 256; k++) {
                    if (kill(recv[r], SIGUSR1) == 0) n++;
                    if (++r == nrecv) r = 0;
                }
                if (now_s() >= end) break;
            }
            sh->sent[i] = n;
            _exit(0);
        }
        send[i] = p;
    }
    double t0 = now_s();
    sh->go = 1;
    for (int i = 0; i < nsend; i++) waitpid(send[i], NULL, 0);
    double elapsed = now_s() - t0;
    usleep(200000); /* let the last pending signals be handled */
    long sent = 0, handled = 0;
    for (int i = 0; i < nsend; i++) sent += sh->sent[i];
    for (int i = 0; i < nrecv; i++) handled += sh->handled[i];
    for (int i = 0; i < nrecv; i++) kill(recv[i], SIGKILL);
    for (int i = 0; i < nrecv; i++) waitpid(recv[i], NULL, 0);
    printf("sent=%ld handled=%ld seconds=%.3f\n", sent, handled, elapsed);
    return 0;
}
