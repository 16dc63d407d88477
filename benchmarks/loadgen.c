/*
 * loadgen: the closed-loop load generator of the trio-upper benchmarks.
 *
 * One thread, non-blocking sockets, level-triggered epoll. Written in C so
 * that the client side costs far less than any Python server it measures: on
 * its own core it can always keep the server busy, so a slow server shows up
 * as fewer requests per second and higher latency, never as an idle client.
 *
 * Modes (see benchmarks/README.md):
 *   tcp      C connections, each sends D copies of the payload at once and
 *            waits for all D replies before the next round (D = --depth).
 *            Reading and writing are interleaved, so 64 KiB messages (bulk)
 *            cannot deadlock against a server that echoes as it reads.
 *   connect  C slots, each: new connection, send, read the reply, close.
 *   udp      C connected UDP sockets, one request outstanding on each.
 *   idle     open --count connections with one request/reply each, then hold
 *            them until stdin closes.
 *
 * TLS (tcp mode only, --tls --cafile FILE): each connection's handshake is
 * done before the warm-up, so the figures are of requests over TLS, not of
 * handshakes. Only in a binary built with -DLOADGEN_TLS and OpenSSL (libssl),
 * which the harness builds as loadgen-tls where OpenSSL's headers are found;
 * the plain binary needs nothing but libc.
 *
 * Every reply byte is compared with the expected reply (a file the harness
 * writes, computed by the very transform the server is meant to apply).
 *
 * Protocol with the harness, on stdout, one line each:
 *   START      the warm-up is over and nothing is in flight; the generator
 *              waits for a line on stdin, then the measured window begins.
 *   END        the window is over and nothing is in flight (idle mode prints
 *              "READY n" instead, once n more connections are held); the
 *              generator waits for stdin to close, then closes its sockets.
 *   {...}      one JSON object with the figures; the last line.
 * The pauses at both marks let the harness read the server's CPU time while
 * the server is idle, so the sample is exact whatever the pipe latency. A
 * fatal error prints the JSON object at once, with "fatal" set.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#endif

#define MAX_EVENTS 512
#define SCRATCH_SIZE (256 * 1024)
#define TAG_LEN 8         /* UDP request tag: 2 letters of socket, 6 of sequence */
#define TAG_SOCKETS 676   /* 26^2 */
#define TAG_SEQS 308915776u /* 26^6 */
#define LATE_RING 8       /* timed-out UDP sequence numbers remembered per socket */
#define MAX_DIAGNOSTICS 5 /* mismatch and error reports printed on stderr */

/* Latency histogram: log-linear over nanoseconds, 128 buckets per power of
 * two, so every recorded value is within 0.8% of its bucket's midpoint. */
#define SUB_BITS 7
#define SUB_COUNT (1u << SUB_BITS)
#define NBUCKETS (64u * SUB_COUNT)

/* Error kinds: errno values count under their own name; these two are ours. */
#define ERR_SLOTS 256
#define ERR_EOF 254   /* the server closed a connection that owed a reply */
#define ERR_OTHER 255 /* an errno too large for the table */

#define STDIN_TAG UINT32_MAX

enum mode { MODE_TCP, MODE_CONNECT, MODE_UDP, MODE_IDLE };
enum phase { PH_WARMUP, PH_DRAIN_WARMUP, PH_MEASURE, PH_DRAIN_MEASURE, PH_DONE };
enum state {
    ST_IDLE,       /* nothing in flight */
    ST_CONNECTING, /* non-blocking connect in progress */
    ST_BUSY,       /* request sent or being sent, reply owed */
    ST_RETRY,      /* connect mode: attempt failed, try again next turn */
    ST_HELD,       /* idle mode: answered once, now held open */
    ST_DEAD,       /* closed after an error or a mismatch */
};

struct conn {
    int fd;
    enum state state;
    uint32_t events; /* current epoll interest, 0 if not registered */
    size_t sent;     /* bytes of the request written */
    size_t rcvd;     /* bytes of the reply received and checked */
    uint64_t t0;     /* when the current (logical) request began, ns */
    /* UDP only */
    uint32_t seq;
    uint64_t deadline;
    uint32_t late_ring[LATE_RING];
    unsigned late_next;
#ifdef LOADGEN_TLS
    SSL *ssl; /* NULL without --tls */
#endif
};

struct stats {
    uint64_t requests, bytes_sent, bytes_received;
    uint64_t mismatches, losses, late, connections_lost;
    uint64_t err[ERR_SLOTS];
    uint64_t lat_count, lat_max;
    double lat_sum;
    uint64_t hist[NBUCKETS];
};

static struct {
    enum mode mode;
    const char *host;
    int port;
    int connections;
    int depth;
    int count;
    int warm;
    const char *payload_path;
    const char *expect_path;
    double warmup;
    double duration;
    double udp_timeout_ms;
    bool tls;
    const char *cafile;
} opt = {
    .host = "127.0.0.1",
    .port = 0,
    .connections = 50,
    .depth = 1,
    .count = 10000,
    .warm = 50,
    .warmup = 2.0,
    .duration = 10.0,
    .udp_timeout_ms = 250.0,
};

static struct stats warm_stats, meas_stats;
static struct stats *cur = &warm_stats;

static struct sockaddr_in server;
static int ep = -1;
static struct conn *conns;
static int nconns;
static enum phase phase = PH_WARMUP;
static int busy;       /* connections with a request in flight */
static int live;       /* tcp mode: connections not dead */
static int retrying;   /* connect mode: slots waiting to try again */
static int in_flight;  /* idle mode: openings not finished */
static int open_next;  /* idle mode: next connection to open */
static int open_end;   /* idle mode: end of the current batch */
static int held_batch; /* idle mode: connections held from the current batch */
static uint64_t t_start, t_end;
static double cpu_start, cpu_end; /* our own CPU seconds at each end of the window */
static int diagnostics;

static unsigned char *payload, *expect;  /* one message and its reply */
static size_t payload_len, expect_len;
static unsigned char *req_buf, *exp_buf; /* depth copies of each */
static size_t req_len, exp_len;
static unsigned char scratch[SCRATCH_SIZE];

static void finish(const char *fatal);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double own_cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(const char *fmt, ...)
{
    char message[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    fprintf(stderr, "loadgen: %s\n", message);
    finish(message);
}

static void say(const char *line)
{
    /* The harness reads these lines as they come, so never let them sit in
     * a buffer. */
    fputs(line, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

/* --- Histogram ------------------------------------------------------------ */

static unsigned bucket_of(uint64_t v)
{
    if (v < 2 * SUB_COUNT)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - SUB_BITS;
    return (shift + 1) * SUB_COUNT + (unsigned)(v >> shift) - SUB_COUNT;
}

static double bucket_mid(unsigned index)
{
    if (index < 2 * SUB_COUNT)
        return (double)index;
    unsigned shift = index / SUB_COUNT - 1;
    uint64_t mantissa = index % SUB_COUNT + SUB_COUNT;
    uint64_t low = mantissa << shift;
    uint64_t high = ((mantissa + 1) << shift) - 1;
    return ((double)low + (double)high) / 2.0;
}

static void record_latency(uint64_t t0)
{
    uint64_t ns = now_ns() - t0;
    unsigned b = bucket_of(ns);
    if (b >= NBUCKETS)
        b = NBUCKETS - 1;
    cur->hist[b]++;
    cur->lat_count++;
    cur->lat_sum += (double)ns;
    if (ns > cur->lat_max)
        cur->lat_max = ns;
}

static double percentile_us(const struct stats *s, double p)
{
    if (s->lat_count == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(p * (double)s->lat_count + 0.999999);
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < NBUCKETS; i++) {
        seen += s->hist[i];
        if (seen >= rank) {
            double mid = bucket_mid(i);
            /* A bucket's midpoint may lie above the largest value seen. */
            if (mid > (double)s->lat_max)
                mid = (double)s->lat_max;
            return mid / 1000.0;
        }
    }
    return (double)s->lat_max / 1000.0;
}

/* --- Errors and mismatches -------------------------------------------------- */

static const char *error_name(int code, char *buf, size_t size)
{
    switch (code) {
    case ERR_EOF:
        return "unexpected_eof";
    case ERR_OTHER:
        return "other_error";
    case ECONNREFUSED:
        return "ECONNREFUSED";
    case ECONNRESET:
        return "ECONNRESET";
    case EADDRNOTAVAIL:
        return "EADDRNOTAVAIL";
    case EADDRINUSE:
        return "EADDRINUSE";
    case ETIMEDOUT:
        return "ETIMEDOUT";
    case EPIPE:
        return "EPIPE";
    case EMFILE:
        return "EMFILE";
    case ENFILE:
        return "ENFILE";
    case ENOBUFS:
        return "ENOBUFS";
    case ENOMEM:
        return "ENOMEM";
    case EAGAIN:
        return "EAGAIN";
    case EHOSTUNREACH:
        return "EHOSTUNREACH";
    case EPROTO:
        return "tls_error";
    case ENETUNREACH:
        return "ENETUNREACH";
    default:
        snprintf(buf, size, "errno_%d", code);
        return buf;
    }
}

static uint64_t error_total(const struct stats *s)
{
    uint64_t total = 0;
    for (int i = 0; i < ERR_SLOTS; i++)
        total += s->err[i];
    return total;
}

static void count_error(int code, const char *what)
{
    if (code <= 0 || code >= ERR_SLOTS)
        code = ERR_OTHER;
    cur->err[code]++;
    if (diagnostics < MAX_DIAGNOSTICS) {
        char buf[32];
        diagnostics++;
        fprintf(stderr, "loadgen: error while %s: %s\n", what,
                error_name(code, buf, sizeof buf));
    }
}

static void hexdump(const char *label, const unsigned char *p, size_t n)
{
    fprintf(stderr, "  %s:", label);
    for (size_t i = 0; i < n; i++)
        fprintf(stderr, " %02x", p[i]);
    fputc('\n', stderr);
}

static void report_mismatch(const char *why, size_t offset, const unsigned char *want,
                            size_t want_n, const unsigned char *got, size_t got_n)
{
    cur->mismatches++;
    if (diagnostics >= MAX_DIAGNOSTICS)
        return;
    diagnostics++;
    fprintf(stderr, "loadgen: MISMATCH (%s) at reply byte %zu\n", why, offset);
    hexdump("expected", want, want_n < 16 ? want_n : 16);
    hexdump("received", got, got_n < 16 ? got_n : 16);
}

/* Compare n received bytes with the reply expected at offset *rcvd of exp;
 * on success advance *rcvd. Bytes beyond the expected reply are a mismatch
 * too: the server cannot owe them, since the next request is not sent yet. */
static bool check_reply(size_t *rcvd, const unsigned char *exp, size_t total,
                        const unsigned char *got, size_t n)
{
    size_t want = total - *rcvd;
    size_t common = n < want ? n : want;
    if (memcmp(exp + *rcvd, got, common) != 0) {
        size_t i = 0;
        while (exp[*rcvd + i] == got[i])
            i++;
        report_mismatch("wrong bytes", *rcvd + i, exp + *rcvd + i, total - *rcvd - i, got + i,
                        n - i);
        return false;
    }
    if (n > want) {
        report_mismatch("more bytes than the reply", total, exp, 0, got + want, n - want);
        return false;
    }
    *rcvd += n;
    return true;
}

/* --- Sockets ------------------------------------------------------------------ */

static void set_interest(struct conn *c, uint32_t index, uint32_t events)
{
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.u32 = index};
    int op = c->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (epoll_ctl(ep, op, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    c->events = events;
}

static void close_conn(struct conn *c)
{
#ifdef LOADGEN_TLS
    if (c->ssl) {
        /* close_notify, so that a server sees a clean end and says nothing
         * about it; sent without waiting for the server's. */
        SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
#endif
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->events = 0;
}

static void set_nodelay(int fd)
{
    /* The servers all set TCP_NODELAY; so does the client, so that Nagle's
     * algorithm on our side never holds back the tail of a message. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int index_of(const struct conn *c) { return (int)(c - conns); }

/* --- TLS ------------------------------------------------------------------------ */

#ifdef LOADGEN_TLS
static SSL_CTX *tls_ctx;

/* An SSL_read or SSL_write that did not move data, as send() and recv()
 * would say it: 0 for the end of the stream, -1 with errno (EAGAIN for "try
 * again when the socket is ready", EPROTO for a TLS protocol error). */
static ssize_t tls_result(SSL *ssl, int ret)
{
    switch (SSL_get_error(ssl, ret)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN:
        return 0;
    case SSL_ERROR_SYSCALL:
        return errno == 0 ? 0 : -1;
    default:
        if (diagnostics < MAX_DIAGNOSTICS) {
            char buf[256];
            ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
            fprintf(stderr, "loadgen: TLS: %s\n", buf);
        }
        errno = EPROTO;
        return -1;
    }
}

static void tls_setup(void)
{
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx)
        die("SSL_CTX_new failed");
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_load_verify_locations(tls_ctx, opt.cafile, NULL) != 1)
        die("cannot load --cafile %s", opt.cafile);
    /* send()'s semantics: a write may take part of the buffer. */
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
    /* A server that closes without close_notify reads as an end of stream,
     * counted as such, as over plain TCP. */
    SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
}

/* The handshake of a connected non-blocking socket, waiting as it must. */
static void tls_connect(struct conn *c)
{
    c->ssl = SSL_new(tls_ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1)
        die("SSL_new failed");
    SSL_set_tlsext_host_name(c->ssl, "localhost");
    SSL_set1_host(c->ssl, "localhost");
    for (;;) {
        errno = 0;
        int ret = SSL_connect(c->ssl);
        if (ret == 1)
            return;
        int err = SSL_get_error(c->ssl, ret);
        if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
            char buf[256];
            ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
            die("TLS handshake with %s port %d failed: %s (%s)", opt.host, opt.port, buf,
                strerror(errno));
        }
        struct pollfd pfd = {.fd = c->fd, .events = err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT};
        if (poll(&pfd, 1, 60000) <= 0)
            die("TLS handshake with %s port %d timed out", opt.host, opt.port);
    }
}
#endif

/* send() and recv() on a connection, through TLS if it has it. */
static ssize_t conn_send(struct conn *c, const void *buf, size_t len)
{
#ifdef LOADGEN_TLS
    if (c->ssl) {
        errno = 0;
        int n = SSL_write(c->ssl, buf, len > INT32_MAX ? INT32_MAX : (int)len);
        return n > 0 ? n : tls_result(c->ssl, n);
    }
#endif
    return send(c->fd, buf, len, MSG_NOSIGNAL);
}

static ssize_t conn_recv(struct conn *c, void *buf, size_t len)
{
#ifdef LOADGEN_TLS
    if (c->ssl) {
        errno = 0;
        int n = SSL_read(c->ssl, buf, (int)len);
        return n > 0 ? n : tls_result(c->ssl, n);
    }
#endif
    return recv(c->fd, buf, len, 0);
}

/* Whether a connection may hold received bytes that epoll cannot see: TLS
 * decrypts a record at a time, so after a read there may be more of it. */
static bool conn_buffers(const struct conn *c)
{
#ifdef LOADGEN_TLS
    return c->ssl != NULL;
#else
    (void)c;
    return false;
#endif
}

static bool accepting_new_requests(void) { return phase == PH_WARMUP || phase == PH_MEASURE; }

/* --- Stream requests (tcp, connect and idle modes) ---------------------------- */

static void stream_failed(struct conn *c, int code, const char *what);
static void connect_start(struct conn *c, bool keep_t0);
static void idle_open_more(void);

static void stream_flush(struct conn *c)
{
    while (c->sent < req_len) {
        ssize_t n = conn_send(c, req_buf + c->sent, req_len - c->sent);
        if (n > 0) {
            c->sent += (size_t)n;
            cur->bytes_sent += (uint64_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        stream_failed(c, n < 0 ? errno : ERR_EOF, "sending");
        return;
    }
    set_interest(c, (uint32_t)index_of(c), EPOLLIN | (c->sent < req_len ? EPOLLOUT : 0));
}

static void stream_begin(struct conn *c)
{
    c->sent = 0;
    c->rcvd = 0;
    c->t0 = now_ns();
    c->state = ST_BUSY;
    busy++;
    stream_flush(c);
}

static void stream_done(struct conn *c)
{
    record_latency(c->t0);
    cur->requests += (uint64_t)(opt.mode == MODE_TCP ? opt.depth : 1);
    c->state = ST_IDLE;
    switch (opt.mode) {
    case MODE_TCP:
        busy--;
        if (accepting_new_requests())
            stream_begin(c);
        break;
    case MODE_CONNECT:
        busy--;
        close_conn(c);
        if (accepting_new_requests())
            connect_start(c, false);
        break;
    case MODE_IDLE:
        /* Held: a byte or an end of stream from now on is an error. */
        c->state = ST_HELD;
        held_batch++;
        in_flight--;
        set_interest(c, (uint32_t)index_of(c), EPOLLIN | EPOLLRDHUP);
        idle_open_more();
        break;
    case MODE_UDP:
        break;
    }
}

static void stream_failed(struct conn *c, int code, const char *what)
{
    count_error(code, what);
    close_conn(c);
    bool was_busy = c->state == ST_BUSY || c->state == ST_CONNECTING;
    switch (opt.mode) {
    case MODE_TCP:
        if (was_busy)
            busy--;
        c->state = ST_DEAD;
        cur->connections_lost++;
        if (--live == 0)
            die("every connection was lost");
        break;
    case MODE_CONNECT:
        /* Try again on the next turn of the loop rather than at once, so a
         * refusing server or a shortage of ports is not hammered in a spin. */
        c->state = ST_RETRY;
        retrying++;
        break;
    case MODE_IDLE:
        if (c->state == ST_HELD)
            cur->connections_lost++;
        else
            in_flight--;
        c->state = ST_DEAD;
        idle_open_more();
        break;
    case MODE_UDP:
        break;
    }
}

static void stream_mismatch_close(struct conn *c)
{
    /* The stream is out of step after a wrong byte: nothing after it can be
     * checked, so the connection goes. */
    bool was_busy = c->state == ST_BUSY;
    close_conn(c);
    switch (opt.mode) {
    case MODE_TCP:
        if (was_busy)
            busy--;
        c->state = ST_DEAD;
        cur->connections_lost++;
        if (--live == 0)
            die("every connection was lost");
        break;
    case MODE_CONNECT:
        if (was_busy)
            busy--;
        c->state = ST_IDLE;
        if (accepting_new_requests())
            connect_start(c, false);
        break;
    case MODE_IDLE:
        if (c->state != ST_HELD)
            in_flight--;
        c->state = ST_DEAD;
        idle_open_more();
        break;
    case MODE_UDP:
        break;
    }
}

static bool stream_read_once(struct conn *c);

static void stream_readable(struct conn *c)
{
    /* Over TLS, read until the socket has nothing more: a record already
     * taken in and decrypted would never wake epoll again. */
    while (stream_read_once(c) && conn_buffers(c))
        continue;
}

/* One read and what follows from it; true if it took bytes and the
 * connection is still open. */
static bool stream_read_once(struct conn *c)
{
    errno = 0;
    ssize_t n = conn_recv(c, scratch, sizeof scratch);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return false;
        stream_failed(c, errno, c->state == ST_HELD ? "holding" : "receiving");
        return false;
    }
    if (n == 0) {
        stream_failed(c, ERR_EOF, c->state == ST_HELD ? "holding" : "receiving");
        return false;
    }
    cur->bytes_received += (uint64_t)n;
    if (c->state != ST_BUSY) {
        report_mismatch("bytes with no request outstanding", 0, exp_buf, 0, scratch, (size_t)n);
        stream_mismatch_close(c);
        return false;
    }
    if (!check_reply(&c->rcvd, exp_buf, exp_len, scratch, (size_t)n)) {
        stream_mismatch_close(c);
        return false;
    }
    if (c->rcvd == exp_len && c->sent == req_len)
        stream_done(c);
    return c->fd >= 0;
}

static void connect_finished(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err != 0) {
        stream_failed(c, err, "connecting");
        return;
    }
    c->state = ST_BUSY;
    stream_flush(c);
}

/* Begin a request on a new connection. keep_t0: a retry of the same logical
 * request, whose latency still counts from the first attempt. */
static void connect_start(struct conn *c, bool keep_t0)
{
    if (!keep_t0) {
        c->t0 = now_ns();
        if (opt.mode == MODE_CONNECT)
            busy++; /* idle mode counts its openings in in_flight instead */
    }
    c->sent = 0;
    c->rcvd = 0;
    c->events = 0;
    c->state = ST_CONNECTING;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        stream_failed(c, errno, "opening a socket");
        return;
    }
    set_nodelay(c->fd);
    if (connect(c->fd, (struct sockaddr *)&server, sizeof server) == 0) {
        c->state = ST_BUSY;
        stream_flush(c);
    } else if (errno == EINPROGRESS) {
        set_interest(c, (uint32_t)index_of(c), EPOLLOUT);
    } else {
        stream_failed(c, errno, "connecting");
    }
}

static void connect_retry_pending(void)
{
    for (int i = 0; i < nconns && retrying > 0; i++) {
        struct conn *c = &conns[i];
        if (c->state != ST_RETRY)
            continue;
        retrying--;
        if (accepting_new_requests()) {
            connect_start(c, true);
        } else {
            c->state = ST_IDLE;
            busy--;
        }
    }
}

static void stream_event(struct conn *c, uint32_t events)
{
    if (c->state == ST_CONNECTING) {
        connect_finished(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
        stream_readable(c);
        if (c->fd < 0 || c->state != ST_BUSY)
            return;
    }
    if ((events & EPOLLOUT) && c->sent < req_len)
        stream_flush(c);
}

/* --- Idle mode ------------------------------------------------------------------ */

static void idle_open_more(void)
{
    /* A connection that fails at once calls back in here; the loop below
     * carries on for it, so the calls never nest. */
    static bool opening;
    if (opening)
        return;
    opening = true;
    while (in_flight < opt.connections && open_next < open_end) {
        struct conn *c = &conns[open_next++];
        in_flight++;
        connect_start(c, false);
    }
    opening = false;
}

/* --- UDP -------------------------------------------------------------------------- */

static void udp_send(struct conn *c, uint64_t now, bool first)
{
    int index = index_of(c);
    if (first)
        c->t0 = now;
    c->seq = (c->seq + 1) % TAG_SEQS;
    memcpy(scratch, payload, payload_len);
    scratch[0] = (unsigned char)('a' + index / 26);
    scratch[1] = (unsigned char)('a' + index % 26);
    uint32_t s = c->seq;
    for (int i = TAG_LEN - 1; i >= 2; i--) {
        scratch[i] = (unsigned char)('a' + s % 26);
        s /= 26;
    }
    c->deadline = now + (uint64_t)(opt.udp_timeout_ms * 1e6);
    c->state = ST_BUSY;
    ssize_t n = send(c->fd, scratch, payload_len, 0);
    if (n == (ssize_t)payload_len)
        cur->bytes_sent += (uint64_t)n;
    else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        count_error(errno, "sending a datagram");
    /* A datagram that could not be sent is waited for all the same: its
     * timeout counts it lost and sends it again. */
}

static bool udp_decode_tag(const unsigned char *p, int *index, uint32_t *seq)
{
    for (int i = 0; i < TAG_LEN; i++)
        if (p[i] < 'A' || p[i] > 'Z')
            return false;
    *index = (p[0] - 'A') * 26 + (p[1] - 'A');
    uint32_t s = 0;
    for (int i = 2; i < TAG_LEN; i++)
        s = s * 26 + (uint32_t)(p[i] - 'A');
    *seq = s;
    return true;
}

static bool udp_was_timed_out(struct conn *c, uint32_t seq)
{
    for (unsigned i = 0; i < LATE_RING; i++) {
        if (c->late_ring[i] == seq + 1) {
            c->late_ring[i] = 0; /* a second copy would be a duplicate */
            return true;
        }
    }
    return false;
}

static void udp_readable(struct conn *c)
{
    ssize_t n = recv(c->fd, scratch, sizeof scratch, 0);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            count_error(errno, "receiving a datagram");
        return;
    }
    cur->bytes_received += (uint64_t)n;
    size_t len = (size_t)n;
    int index;
    uint32_t seq;
    if (len != expect_len || !udp_decode_tag(scratch, &index, &seq) ||
        index != index_of(c)) {
        report_mismatch("datagram not a reply to this socket", 0, expect, expect_len, scratch,
                        len);
        return;
    }
    size_t rcvd = TAG_LEN;
    if (!check_reply(&rcvd, expect, expect_len, scratch + TAG_LEN, len - TAG_LEN))
        return;
    if (c->state == ST_BUSY && seq == c->seq) {
        record_latency(c->t0);
        cur->requests++;
        if (accepting_new_requests()) {
            udp_send(c, now_ns(), true);
        } else {
            c->state = ST_IDLE;
            busy--;
        }
        return;
    }
    if (udp_was_timed_out(c, seq)) {
        cur->late++;
        return;
    }
    report_mismatch("duplicate or unrequested reply", 0, expect, 0, scratch, TAG_LEN);
}

/* Returns the earliest deadline still pending, or UINT64_MAX. */
static uint64_t udp_check_timeouts(uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->state != ST_BUSY)
            continue;
        if (c->deadline <= now) {
            cur->losses++;
            c->late_ring[c->late_next++ % LATE_RING] = c->seq + 1;
            if (accepting_new_requests()) {
                udp_send(c, now, false);
            } else {
                c->state = ST_IDLE;
                busy--;
                continue;
            }
        }
        if (c->deadline < next)
            next = c->deadline;
    }
    return next;
}

/* --- The harness's side ------------------------------------------------------------- */

/* Block until a line (true) or the end (false) comes on stdin. */
static bool wait_for_line(void)
{
    char ch;
    for (;;) {
        ssize_t n = read(STDIN_FILENO, &ch, 1);
        if (n == 1 && ch == '\n')
            return true;
        if (n == 0)
            return false;
        if (n < 0 && errno != EINTR)
            return false;
    }
}

static void print_stats_fields(const struct stats *s)
{
    char buf[32];
    printf("\"requests\":%" PRIu64 ",\"errors\":%" PRIu64 ",\"error_kinds\":{", s->requests,
           error_total(s));
    bool first = true;
    for (int i = 0; i < ERR_SLOTS; i++) {
        if (s->err[i] == 0)
            continue;
        printf("%s\"%s\":%" PRIu64, first ? "" : ",", error_name(i, buf, sizeof buf), s->err[i]);
        first = false;
    }
    printf("},\"mismatches\":%" PRIu64 ",\"losses\":%" PRIu64 ",\"late\":%" PRIu64
           ",\"connections_lost\":%" PRIu64,
           s->mismatches, s->losses, s->late, s->connections_lost);
}

static void json_string(const char *text)
{
    putchar('"');
    for (const char *p = text; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20)
            printf("\\u%04x", *p);
        else
            putchar(*p);
    }
    putchar('"');
}

static void finish(const char *fatal)
{
    static const char *names[] = {"tcp", "connect", "udp", "idle"};
    const struct stats *s = &meas_stats;
    if (t_end == 0) {
        t_end = now_ns();
        cpu_end = own_cpu_seconds();
    }
    double duration = t_start ? (double)(t_end - t_start) / 1e9 : 0.0;
    printf("{\"mode\":\"%s\",\"connections\":%d,\"depth\":%d,\"request_bytes\":%zu,"
           "\"reply_bytes\":%zu,\"warmup_s\":%.3f,\"duration_s\":%.6f,",
           names[opt.mode], opt.connections, opt.depth, payload_len, expect_len, opt.warmup,
           duration);
    print_stats_fields(s);
    printf(",\"requests_per_s\":%.3f,\"bytes_sent\":%" PRIu64 ",\"bytes_received\":%" PRIu64,
           duration > 0 ? (double)s->requests / duration : 0.0, s->bytes_sent,
           s->bytes_received);
    printf(",\"held\":%d", opt.mode == MODE_IDLE ? held_batch : 0);
    /* Our own CPU time in the window: near 100% of the duration means the
     * generator, not the server, set the pace of requests/s and latency. */
    printf(",\"loadgen_cpu_s\":%.6f", t_start ? cpu_end - cpu_start : 0.0);
    printf(",\"latency_us\":{\"count\":%" PRIu64 ",\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,"
           "\"p999\":%.2f,\"max\":%.2f,\"mean\":%.2f}",
           s->lat_count, percentile_us(s, 0.50), percentile_us(s, 0.90),
           percentile_us(s, 0.99), percentile_us(s, 0.999), (double)s->lat_max / 1000.0,
           s->lat_count ? s->lat_sum / (double)s->lat_count / 1000.0 : 0.0);
    printf(",\"warmup\":{");
    print_stats_fields(&warm_stats);
    printf("},\"fatal\":");
    if (fatal)
        json_string(fatal);
    else
        printf("null");
    printf("}\n");
    fflush(stdout);
    exit(fatal ? 1 : 0);
}

/* --- Setup ------------------------------------------------------------------------------ */

static unsigned char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) < 0)
        die("cannot stat %s: %s", path, strerror(errno));
    size_t size = (size_t)st.st_size;
    unsigned char *data = malloc(size ? size : 1);
    if (!data || fread(data, 1, size, f) != size)
        die("cannot read %s", path);
    fclose(f);
    *len = size;
    return data;
}

static unsigned char *repeat(const unsigned char *data, size_t len, int times)
{
    unsigned char *out = malloc(len * (size_t)times + 1);
    if (!out)
        die("out of memory");
    for (int i = 0; i < times; i++)
        memcpy(out + (size_t)i * len, data, len);
    return out;
}

static void usage(int status)
{
    fprintf(status ? stderr : stdout,
            "usage: loadgen tcp|connect|udp|idle --port P --payload FILE --expect FILE\n"
            "       [--host 127.0.0.1] [--connections 50] [--depth 1] [--warmup 2]\n"
            "       [--duration 10] [--udp-timeout-ms 250] [--count 10000] [--warm 50]\n"
            "       [--tls --cafile FILE]   (tcp mode; a binary built with -DLOADGEN_TLS)\n");
    exit(status);
}

static double parse_number(const char *text, const char *name, double low, double high)
{
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || *end || end == text || value < low || value > high) {
        fprintf(stderr, "loadgen: bad --%s: %s\n", name, text);
        exit(2);
    }
    return value;
}

static void parse_args(int argc, char **argv)
{
    static const struct option longs[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {"connections", required_argument, 0, 'c'},
        {"depth", required_argument, 0, 'd'},
        {"count", required_argument, 0, 'n'},
        {"warm", required_argument, 0, 'W'},
        {"payload", required_argument, 0, 'P'},
        {"expect", required_argument, 0, 'E'},
        {"warmup", required_argument, 0, 'w'},
        {"duration", required_argument, 0, 't'},
        {"udp-timeout-ms", required_argument, 0, 'u'},
        {"tls", no_argument, 0, 'T'},
        {"cafile", required_argument, 0, 'C'},
        {"help", no_argument, 0, 'H'},
        {0, 0, 0, 0},
    };
    if (argc < 2)
        usage(2);
    const char *mode = argv[1];
    if (strcmp(mode, "tcp") == 0)
        opt.mode = MODE_TCP;
    else if (strcmp(mode, "connect") == 0)
        opt.mode = MODE_CONNECT;
    else if (strcmp(mode, "udp") == 0)
        opt.mode = MODE_UDP;
    else if (strcmp(mode, "idle") == 0)
        opt.mode = MODE_IDLE;
    else if (strcmp(mode, "--help") == 0)
        usage(0);
    else
        usage(2);
    optind = 2;
    int ch;
    while ((ch = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = (int)parse_number(optarg, "port", 1, 65535); break;
        case 'c': opt.connections = (int)parse_number(optarg, "connections", 1, 100000); break;
        case 'd': opt.depth = (int)parse_number(optarg, "depth", 1, 4096); break;
        case 'n': opt.count = (int)parse_number(optarg, "count", 0, 1000000); break;
        case 'W': opt.warm = (int)parse_number(optarg, "warm", 0, 100000); break;
        case 'P': opt.payload_path = optarg; break;
        case 'E': opt.expect_path = optarg; break;
        case 'w': opt.warmup = parse_number(optarg, "warmup", 0, 86400); break;
        case 't': opt.duration = parse_number(optarg, "duration", 0.001, 86400); break;
        case 'u': opt.udp_timeout_ms = parse_number(optarg, "udp-timeout-ms", 1, 60000); break;
        case 'T': opt.tls = true; break;
        case 'C': opt.cafile = optarg; break;
        case 'H': usage(0); break;
        default: usage(2);
        }
    }
    if (optind != argc || opt.port == 0 || !opt.payload_path || !opt.expect_path)
        usage(2);
    if (opt.tls && (opt.mode != MODE_TCP || !opt.cafile)) {
        fprintf(stderr, "loadgen: --tls is for tcp mode, and needs --cafile\n");
        exit(2);
    }
#ifndef LOADGEN_TLS
    if (opt.tls) {
        fprintf(stderr, "loadgen: built without TLS (see loadgen.py)\n");
        exit(2);
    }
#endif
    if (opt.mode == MODE_UDP && opt.connections > TAG_SOCKETS) {
        fprintf(stderr, "loadgen: udp mode takes at most %d sockets\n", TAG_SOCKETS);
        exit(2);
    }
}

static void raise_fd_limit(void)
{
    /* Idle mode holds thousands of sockets; the soft limit is often 1024. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void setup_buffers(void)
{
    payload = read_file(opt.payload_path, &payload_len);
    expect = read_file(opt.expect_path, &expect_len);
    if (payload_len == 0)
        die("the payload is empty");
    if (opt.mode == MODE_UDP) {
        /* The tag overwrites the first bytes, so they must uppercase one byte
         * to one byte, as ASCII does in every mode of every server. */
        if (payload_len < TAG_LEN || expect_len < TAG_LEN)
            die("a UDP payload needs at least %d bytes", TAG_LEN);
        for (int i = 0; i < TAG_LEN; i++)
            if (payload[i] >= 0x80 || expect[i] >= 0x80)
                die("a UDP payload must start with %d ASCII bytes", TAG_LEN);
    }
    int copies = opt.mode == MODE_TCP ? opt.depth : 1;
    req_buf = repeat(payload, payload_len, copies);
    exp_buf = repeat(expect, expect_len, copies);
    req_len = payload_len * (size_t)copies;
    exp_len = expect_len * (size_t)copies;
}

static int blocking_connect(int type)
{
    int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0)
        die("cannot connect to %s port %d: %s", opt.host, opt.port, strerror(errno));
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl: %s", strerror(errno));
    return fd;
}

static void setup_conns(void)
{
    nconns = opt.mode == MODE_IDLE ? opt.warm + opt.count : opt.connections;
    conns = calloc((size_t)(nconns ? nconns : 1), sizeof *conns);
    if (!conns)
        die("out of memory");
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].state = ST_IDLE;
    }
    if (opt.mode == MODE_TCP) {
        for (int i = 0; i < nconns; i++) {
            conns[i].fd = blocking_connect(SOCK_STREAM);
            set_nodelay(conns[i].fd);
#ifdef LOADGEN_TLS
            if (opt.tls)
                tls_connect(&conns[i]);
#endif
            set_interest(&conns[i], (uint32_t)i, EPOLLIN);
        }
        live = nconns;
    } else if (opt.mode == MODE_UDP) {
        for (int i = 0; i < nconns; i++) {
            conns[i].fd = blocking_connect(SOCK_DGRAM);
            set_interest(&conns[i], (uint32_t)i, EPOLLIN);
        }
    }
}

/* --- The loop --------------------------------------------------------------------------- */

static void start_all(uint64_t now)
{
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->state != ST_IDLE)
            continue;
        switch (opt.mode) {
        case MODE_TCP:
            stream_begin(c);
            break;
        case MODE_CONNECT:
            connect_start(c, false);
            break;
        case MODE_UDP:
            busy++;
            udp_send(c, now, true);
            break;
        case MODE_IDLE:
            break;
        }
    }
}

static void dispatch(uint32_t index, uint32_t events)
{
    struct conn *c = &conns[index];
    if (opt.mode == MODE_UDP)
        udp_readable(c);
    else
        stream_event(c, events);
}

static int poll_events(int timeout_ms)
{
    static struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(ep, events, MAX_EVENTS, timeout_ms);
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        die("epoll_wait: %s", strerror(errno));
    }
    int stdin_closed = 0;
    for (int i = 0; i < n; i++) {
        if (events[i].data.u32 == STDIN_TAG) {
            char buf[256];
            ssize_t r = read(STDIN_FILENO, buf, sizeof buf);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
                stdin_closed = 1;
            continue;
        }
        dispatch(events[i].data.u32, events[i].events);
    }
    return stdin_closed;
}

static int ms_until(uint64_t deadline, uint64_t now)
{
    if (deadline <= now)
        return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;
    return ms > 1000 ? 1000 : (int)ms;
}

static void run_load(void)
{
    uint64_t now = now_ns();
    uint64_t phase_end = now + (uint64_t)(opt.warmup * 1e9);
    uint64_t udp_next = UINT64_MAX;
    start_all(now);
    while (phase != PH_DONE) {
        int timeout = -1;
        if (phase == PH_WARMUP || phase == PH_MEASURE)
            timeout = ms_until(phase_end, now);
        if (opt.mode == MODE_UDP && udp_next != UINT64_MAX) {
            int t = ms_until(udp_next, now);
            if (timeout < 0 || t < timeout)
                timeout = t;
        }
        if (retrying > 0)
            timeout = timeout < 0 || timeout > 1 ? 1 : timeout;
        poll_events(timeout);
        now = now_ns();
        if (retrying > 0)
            connect_retry_pending();
        if (opt.mode == MODE_UDP && (udp_next == UINT64_MAX || now >= udp_next))
            udp_next = udp_check_timeouts(now);

        if ((phase == PH_WARMUP || phase == PH_MEASURE) && now >= phase_end)
            phase = phase == PH_WARMUP ? PH_DRAIN_WARMUP : PH_DRAIN_MEASURE;
        if (phase == PH_DRAIN_WARMUP && busy == 0) {
            say("START");
            if (!wait_for_line())
                die("stdin closed before the measured window");
            cur = &meas_stats;
            phase = PH_MEASURE;
            cpu_start = own_cpu_seconds();
            now = t_start = now_ns();
            phase_end = now + (uint64_t)(opt.duration * 1e9);
            start_all(now);
            udp_next = UINT64_MAX;
        } else if (phase == PH_DRAIN_MEASURE && busy == 0) {
            t_end = now_ns();
            cpu_end = own_cpu_seconds();
            phase = PH_DONE;
        }
    }
    say("END");
}

static void run_batch(int first, int count)
{
    open_next = first;
    open_end = first + count;
    held_batch = 0;
    idle_open_more();
    while (in_flight > 0 || open_next < open_end)
        poll_events(-1);
}

static void run_idle(void)
{
    run_batch(0, opt.warm);
    say("START");
    if (!wait_for_line())
        die("stdin closed before the measured window");
    cur = &meas_stats;
    cpu_start = own_cpu_seconds();
    t_start = now_ns();
    run_batch(opt.warm, opt.count);
    t_end = now_ns();
    cpu_end = own_cpu_seconds();
    char line[64];
    snprintf(line, sizeof line, "READY %d", held_batch);
    say(line);
}

static void hold_until_stdin_closes(void)
{
    /* Sockets stay watched meanwhile: a server that closes or writes to an
     * idle connection is caught. */
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev) < 0) {
        /* Not pollable (a file, say): just block on it. */
        char buf[256];
        while (read(STDIN_FILENO, buf, sizeof buf) > 0)
            continue;
        return;
    }
    while (!poll_events(-1))
        continue;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    raise_fd_limit();
    setup_buffers();
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &server.sin_addr) != 1)
        die("not an IPv4 address: %s", opt.host);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1: %s", strerror(errno));
#ifdef LOADGEN_TLS
    if (opt.tls)
        tls_setup();
#endif
    setup_conns();
    if (opt.mode == MODE_IDLE)
        run_idle();
    else
        run_load();
    hold_until_stdin_closes();
    for (int i = 0; i < nconns; i++)
        close_conn(&conns[i]);
    finish(NULL);
    return 0;
}
