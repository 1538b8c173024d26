/* kata-colo interference probe: the online CPU-duty workload.
 *
 * One thread per listed CPU, pinned to it. Every PERIOD microseconds (absolute schedule,
 * clock_nanosleep TIMER_ABSTIME on CLOCK_MONOTONIC) a thread runs a fixed amount of CPU work
 * (ITERS rounds of a xorshift loop; `--calibrate US` prints the ITERS that take US microseconds
 * here, best of many trials) and records
 *   unit = end - start      (the wall time of the unit: the online "service time" under contention)
 *   resp = end - scheduled  (adds the wake-up delay; a unit that overruns its period delays the
 *                            next one, which then starts late: open loop, nothing is skipped)
 * After DURATION seconds every thread stops and the samples are written to stdout as text,
 * one line per unit: "<cpu> <unit_ns> <resp_ns>". The probe allocates everything before the
 * first unit and does no I/O while measuring.
 *
 *   probe --cpus 0,1 --period-us 5000 --iters N --duration 10
 *   probe --calibrate 2000
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_CPUS 256

struct worker {
    int cpu;
    long period_ns;
    uint64_t iters;
    struct timespec start;
    long nunits;
    long *unit_ns;
    long *resp_ns;
    long done;
    volatile uint64_t sink;
};

static long ts_ns(const struct timespec *t) { return t->tv_sec * 1000000000L + t->tv_nsec; }

static void ts_from_ns(struct timespec *t, long ns) {
    t->tv_sec = ns / 1000000000L;
    t->tv_nsec = ns % 1000000000L;
}

static uint64_t work(uint64_t iters, uint64_t seed) {
    uint64_t x = seed | 1;
    for (uint64_t i = 0; i < iters; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

static void *run(void *arg) {
    struct worker *w = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0) {
        fprintf(stderr, "probe: cannot pin to CPU %d\n", w->cpu);
        exit(2);
    }
    long base = ts_ns(&w->start);
    for (long k = 0; k < w->nunits; k++) {
        long sched = base + k * w->period_ns;
        struct timespec due, t0, t1;
        ts_from_ns(&due, sched);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &due, NULL) == EINTR) {
        }
        clock_gettime(CLOCK_MONOTONIC, &t0);
        w->sink += work(w->iters, (uint64_t)k + 0x9e3779b97f4a7c15ULL);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        w->unit_ns[k] = ts_ns(&t1) - ts_ns(&t0);
        w->resp_ns[k] = ts_ns(&t1) - sched;
        w->done = k + 1;
    }
    return NULL;
}

static uint64_t calibrate(long target_us) {
    /* Best (least disturbed) of many trials of a fixed probe size, scaled to the target. */
    const uint64_t trial = 200000;
    long best = -1;
    for (int i = 0; i < 200; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        volatile uint64_t s = work(trial, (uint64_t)i + 1);
        (void)s;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long d = ts_ns(&t1) - ts_ns(&t0);
        if (best < 0 || d < best) best = d;
    }
    return (uint64_t)((double)trial * (double)target_us * 1000.0 / (double)best);
}

static int parse_cpus(const char *s, int *cpus) {
    int n = 0;
    char *copy = strdup(s), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int lo, hi;
        if (sscanf(tok, "%d-%d", &lo, &hi) != 2) {
            if (sscanf(tok, "%d", &lo) != 1) { free(copy); return -1; }
            hi = lo;
        }
        for (int c = lo; c <= hi && n < MAX_CPUS; c++) cpus[n++] = c;
    }
    free(copy);
    return n;
}

int main(int argc, char **argv) {
    const char *cpulist = "0";
    long period_us = 5000, cal_us = 0;
    double duration = 10.0;
    uint64_t iters = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "probe: %s needs a value\n", a); return 2; }
        if (!strcmp(a, "--cpus")) cpulist = v;
        else if (!strcmp(a, "--period-us")) period_us = atol(v);
        else if (!strcmp(a, "--iters")) iters = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--calibrate")) cal_us = atol(v);
        else { fprintf(stderr, "probe: unknown option %s\n", a); return 2; }
        i++;
    }
    if (cal_us > 0) {
        printf("%llu\n", (unsigned long long)calibrate(cal_us));
        return 0;
    }
    int cpus[MAX_CPUS];
    int ncpu = parse_cpus(cpulist, cpus);
    if (ncpu <= 0 || iters == 0 || period_us <= 0 || duration <= 0) {
        fprintf(stderr, "usage: probe --cpus LIST --iters N [--period-us US] [--duration S] | --calibrate US\n");
        return 2;
    }
    long nunits = (long)(duration * 1e6 / (double)period_us);
    struct worker *ws = calloc((size_t)ncpu, sizeof(*ws));
    pthread_t *th = calloc((size_t)ncpu, sizeof(*th));
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    start.tv_sec += 1; /* every thread is pinned and waiting before the first unit */
    for (int i = 0; i < ncpu; i++) {
        ws[i].cpu = cpus[i];
        ws[i].period_ns = period_us * 1000L;
        ws[i].iters = iters;
        ws[i].start = start;
        ws[i].nunits = nunits;
        ws[i].unit_ns = calloc((size_t)nunits, sizeof(long));
        ws[i].resp_ns = calloc((size_t)nunits, sizeof(long));
        if (!ws[i].unit_ns || !ws[i].resp_ns) { fprintf(stderr, "probe: out of memory\n"); return 2; }
        if (pthread_create(&th[i], NULL, run, &ws[i]) != 0) { fprintf(stderr, "probe: pthread_create\n"); return 2; }
    }
    for (int i = 0; i < ncpu; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < ncpu; i++)
        for (long k = 0; k < ws[i].done; k++)
            printf("%d %ld %ld\n", ws[i].cpu, ws[i].unit_ns[k], ws[i].resp_ns[k]);
    return 0;
}
