/* kata-colo interference bench: a fixed-rate (open-loop) HTTP load generator, wrk2-style.
 *
 * Request k is due at start + k/RATE regardless of earlier responses. Its latency is measured
 * from that *scheduled* time to the end of its response, so queueing behind a slow server
 * counts (no coordinated omission). HTTP is libcurl's (multi interface, keep-alive connection
 * cache, at most CONNS connections; requests beyond that wait inside curl and the wait is part
 * of their latency). The event loop is epoll + curl's socket API with a nanosecond timeout
 * (epoll_pwait2), so sends are not quantised to milliseconds; how late each send really went
 * out is recorded too and summarised on stderr ("send lateness"), which bounds the generator's
 * own error.
 *
 * stdout, one line per finished request: "<latency_ns> <send_late_ns> <ok>" (ok = 1 for a 2xx).
 *
 *   loadgen --url http://127.0.0.1:8080/ --rate 500 --duration 10 [--conns 16]
 */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

struct req {
    long sched_ns;
    long sent_ns;
    char err[CURL_ERROR_SIZE];
};

static int epfd;
static long curl_timeout_ns = -1; /* -1: none requested */
static CURLM *multi;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static size_t discard(char *p, size_t size, size_t n, void *u) {
    (void)p; (void)u;
    return size * n;
}

static int on_socket(CURL *e, curl_socket_t s, int what, void *up, void *sp) {
    (void)e; (void)up; (void)sp;
    struct epoll_event ev = {0};
    ev.data.fd = s;
    if (what == CURL_POLL_REMOVE) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, s, NULL);
        return 0;
    }
    ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0) | (what & CURL_POLL_OUT ? EPOLLOUT : 0);
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT)
        epoll_ctl(epfd, EPOLL_CTL_ADD, s, &ev);
    return 0;
}

static int on_timer(CURLM *m, long timeout_ms, void *u) {
    (void)m; (void)u;
    curl_timeout_ns = timeout_ms < 0 ? -1 : now_ns() + timeout_ms * 1000000L;
    return 0;
}

static long finished, failed;

static void reap(void) {
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(multi, &left))) {
        if (msg->msg != CURLMSG_DONE) continue;
        CURL *e = msg->easy_handle;
        struct req *r;
        long code = 0;
        curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&r);
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
        long end = now_ns();
        int ok = msg->data.result == CURLE_OK && code >= 200 && code < 300;
        if (!ok) {
            failed++;
            if (failed <= 5) fprintf(stderr, "loadgen: request failed: %s (HTTP %ld) %s\n",
                                     curl_easy_strerror(msg->data.result), code, r->err);
        }
        printf("%ld %ld %d\n", end - r->sched_ns, r->sent_ns - r->sched_ns, ok);
        finished++;
        curl_multi_remove_handle(multi, e);
        curl_easy_cleanup(e);
        free(r);
    }
}

int main(int argc, char **argv) {
    const char *url = NULL;
    double rate = 0, duration = 0;
    long conns = 16;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--url")) url = argv[i + 1];
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--conns")) conns = atol(argv[i + 1]);
        else { fprintf(stderr, "loadgen: unknown option %s\n", argv[i]); return 2; }
    }
    if (!url || rate <= 0 || duration <= 0 || conns < 1) {
        fprintf(stderr, "usage: loadgen --url URL --rate PER_SEC --duration SECONDS [--conns N]\n");
        return 2;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) return 2;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    multi = curl_multi_init();
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, conns);
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, conns);
    long interval = (long)(1e9 / rate);
    long total = (long)(rate * duration);
    long start = now_ns() + 100000000L, next = 0;
    long late_max = 0, late_sum = 0;
    int running = 0;
    while (finished < total) {
        long now = now_ns();
        while (next < total && start + next * interval <= now) {
            struct req *r = calloc(1, sizeof(*r));
            CURL *e = curl_easy_init();
            r->sched_ns = start + next * interval;
            curl_easy_setopt(e, CURLOPT_URL, url);
            curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
            curl_easy_setopt(e, CURLOPT_PRIVATE, r);
            curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->err);
            curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 10000L);
            curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
            r->sent_ns = now_ns();
            long late = r->sent_ns - r->sched_ns;
            late_sum += late;
            if (late > late_max) late_max = late;
            curl_multi_add_handle(multi, e);
            next++;
        }
        curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
        reap();
        now = now_ns();
        long wake = next < total ? start + next * interval : now + 1000000000L;
        if (curl_timeout_ns >= 0 && curl_timeout_ns < wake) wake = curl_timeout_ns;
        long wait = wake > now ? wake - now : 0;
        struct timespec ts = {wait / 1000000000L, wait % 1000000000L};
        struct epoll_event evs[64];
        int n = epoll_pwait2(epfd, evs, 64, &ts, NULL);
        for (int i = 0; i < n; i++) {
            int flags = (evs[i].events & EPOLLIN ? CURL_CSELECT_IN : 0) |
                        (evs[i].events & EPOLLOUT ? CURL_CSELECT_OUT : 0) |
                        (evs[i].events & (EPOLLERR | EPOLLHUP) ? CURL_CSELECT_ERR : 0);
            curl_multi_socket_action(multi, evs[i].data.fd, flags, &running);
        }
        reap();
    }
    fprintf(stderr, "loadgen: %ld requests, %ld failed; send lateness mean %.1f us, max %.1f us\n",
            finished, failed, total ? (double)late_sum / (double)total / 1e3 : 0.0, (double)late_max / 1e3);
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    return failed ? 1 : 0;
}
