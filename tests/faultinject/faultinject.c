/* Fault injection for a real server process, by LD_PRELOAD.
 *
 * Wraps the socket calls a Python server makes (accept4, recv, recvfrom,
 * send, sendto) and, on IPv4 and IPv6 sockets only, makes some of them fail
 * *instead of* reaching the kernel: a failed receive leaves the data queued, a
 * failed accept leaves the connection in the queue, a failed send sends
 * nothing. Unix sockets (trio's wake-up socketpair) are never touched.
 *
 * TRIO_UPPER_FAULTS is a list of CALL:ERRNO:EVERY separated by commas, such
 * as "recvfrom:ENOBUFS:7,accept4:ECONNABORTED:3": every EVERY-th eligible call
 * of CALL fails with ERRNO (counted per entry). At exit, the number of faults
 * injected per entry is written to the file TRIO_UPPER_FAULTS_REPORT, one
 * "CALL:ERRNO COUNT" line each, if that is set.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

enum call { ACCEPT4, RECV, RECVFROM, SEND, SENDTO, CALLS };
static const char *call_names[CALLS] = {"accept4", "recv", "recvfrom", "send", "sendto"};

struct entry {
    enum call call;
    int error;
    const char *error_name;
    unsigned long every, seen, injected;
};

#define MAX_ENTRIES 32
static struct entry entries[MAX_ENTRIES];
static int n_entries = -1;

static const struct { const char *name; int value; } errnos[] = {
    {"ENOBUFS", ENOBUFS}, {"ENOMEM", ENOMEM}, {"EAGAIN", EAGAIN},
    {"ECONNABORTED", ECONNABORTED}, {"ECONNRESET", ECONNRESET},
    {"ECONNREFUSED", ECONNREFUSED}, {"EHOSTUNREACH", EHOSTUNREACH},
    {"EMFILE", EMFILE}, {"ENFILE", ENFILE}, {"EPROTO", EPROTO},
};

static void parse(void) {
    n_entries = 0;
    const char *spec = getenv("TRIO_UPPER_FAULTS");
    if (!spec) return;
    char *copy = strdup(spec), *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item && n_entries < MAX_ENTRIES;
         item = strtok_r(NULL, ",", &save)) {
        char call[32], err[32];
        unsigned long every;
        if (sscanf(item, "%31[^:]:%31[^:]:%lu", call, err, &every) != 3 || every == 0) continue;
        struct entry *e = &entries[n_entries];
        e->call = CALLS;
        for (int c = 0; c < CALLS; c++)
            if (strcmp(call, call_names[c]) == 0) e->call = c;
        e->error = 0;
        for (size_t i = 0; i < sizeof errnos / sizeof errnos[0]; i++)
            if (strcmp(err, errnos[i].name) == 0) {
                e->error = errnos[i].value;
                e->error_name = errnos[i].name;
            }
        if (e->call == CALLS || e->error == 0) continue;
        e->every = every;
        n_entries++;
    }
}

static int inet_socket(int fd) {
    int domain;
    socklen_t len = sizeof domain;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return 0;
    return domain == AF_INET || domain == AF_INET6;
}

/* Returns the errno to fail this call with, or 0 to let it through. */
static int fault(enum call call, int fd) {
    if (n_entries < 0) parse();
    int chosen = 0;
    for (int i = 0; i < n_entries; i++) {
        struct entry *e = &entries[i];
        if (e->call != call) continue;
        if (!inet_socket(fd)) return 0;
        if (++e->seen % e->every == 0 && !chosen) {
            e->injected++;
            chosen = e->error;
        }
    }
    return chosen;
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("TRIO_UPPER_FAULTS_REPORT");
    if (!path || n_entries <= 0) return;
    FILE *out = fopen(path, "w");
    if (!out) return;
    for (int i = 0; i < n_entries; i++)
        fprintf(out, "%s:%s %lu\n", call_names[entries[i].call], entries[i].error_name,
                entries[i].injected);
    fclose(out);
}

#define REAL(name) static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    REAL(accept4);
    int error = fault(ACCEPT4, fd);
    if (error) { errno = error; return -1; }
    return real_accept4(fd, addr, len, flags);
}

ssize_t recv(int fd, void *buf, size_t n, int flags) {
    REAL(recv);
    int error = fault(RECV, fd);
    if (error) { errno = error; return -1; }
    return real_recv(fd, buf, n, flags);
}

ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr, socklen_t *len) {
    REAL(recvfrom);
    int error = fault(RECVFROM, fd);
    if (error) { errno = error; return -1; }
    return real_recvfrom(fd, buf, n, flags, addr, len);
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    REAL(send);
    int error = fault(SEND, fd);
    if (error) { errno = error; return -1; }
    return real_send(fd, buf, n, flags);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
               socklen_t len) {
    REAL(sendto);
    int error = fault(SENDTO, fd);
    if (error) { errno = error; return -1; }
    return real_sendto(fd, buf, n, flags, addr, len);
}
