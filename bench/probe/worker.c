/* kata-colo interference bench: the offline guest workload (static binary run in the VM).
 *
 * One busy thread per online CPU (sysconf), each running fixed work units (ITERS rounds of a
 * xorshift loop) and adding each finished unit to a shared counter. Every 500 ms the main
 * thread prints "units <total>" (cumulative, flushed). The host timestamps the lines it reads,
 * so throughput = Δunits / Δhost time, immune to guest clock jumps (a frozen VM).
 *
 *   worker [ITERS]     (default 20000)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static atomic_ulong total;
static uint64_t iters = 20000;
static volatile uint64_t sink[64]; /* each unit's result escapes: the compiler must compute it */

static void *spin(void *arg) {
    uint64_t x = (uintptr_t)arg * 2654435761u + 1;
    for (;;) {
        for (uint64_t i = 0; i < iters; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        sink[((uintptr_t)arg * 8) % 64] = x;
        atomic_fetch_add_explicit(&total, 1, memory_order_relaxed);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) iters = strtoull(argv[1], NULL, 10);
    if (iters == 0) iters = 20000;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    for (long i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, spin, (void *)(uintptr_t)(i + 1)) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    printf("threads %ld\n", n);
    fflush(stdout);
    struct timespec half = {0, 500000000L};
    for (;;) {
        nanosleep(&half, NULL);
        printf("units %lu\n", (unsigned long)atomic_load(&total));
        fflush(stdout);
    }
}
