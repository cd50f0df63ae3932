/*
 * prefork_server: a small prefork HTTPS server whose workers share one TLS session cache
 * through cluster-tls-store. Written only against include/cluster_tls_store.h.
 *
 *   prefork_server --port P --workers N --cert F --key F [--no-share] [--no-tickets]
 *                  [--tls12] [--ns NAME] [--get-timeout-us N] [--threads T] [--reuseport]
 *                  [--sticky] [--deadline-ms MS] [--switch-ns NAME]
 *
 * The master opens the listening socket (port 0 picks a free one), sets up the shared cache,
 * and forks N workers, which inherit the socket. One accept loop of each worker at a time
 * blocks in accept4 on it, and the kernel hands each connection to the worker whose loop has
 * waited longest: consecutive connections go to different workers, so a client that resumes
 * usually lands on a worker that did not make its session. (One listening socket inherited by
 * every worker is nginx's default too.) A loop that leaves connections waiting as it accepts
 * wakes another loop of its worker, so none waits while a loop idles (see accept_loop).
 *
 * --reuseport gives each worker its own SO_REUSEPORT listening socket on the port instead
 * (the master reserves the port with a bound, non-listening one): the kernel draws a worker
 * for each connection by a hash of its addresses, and a worker whose loops are all busy
 * queues it while another idles.
 *
 * --sticky (Linux, for benchmarks; implies --reuseport) steers each connection by its
 * client's IPv4 address instead: a classic BPF program on the SO_REUSEPORT group picks
 * listening socket `source address % N`, so every connection of one client reaches the same
 * worker. With `--no-share` that is the layout control of bench/run.sh: N processes, each
 * with OpenSSL's own cache, which resumes every session without any store (its clients
 * connect from distinct loopback addresses, loadgen --source-addrs). A worker's index in the
 * group is the order in which the workers began listening, so the mapping is fixed but not
 * predictable.
 *
 * Each connection's writes are held and sent when OpenSSL ends a handshake flight, when the
 * server turns to reading, and at the end (struct conn_io): a resumed connection's reply and
 * close_notify, and with TLS 1.3 often its session ticket, leave in one TCP segment.
 *
 * --switch-ns NAME makes each worker a second SSL_CTX, shared under namespace NAME, and
 * moves every connection to it from the client-hello callback of the listening one, as a
 * server that picks a site's context by the ClientHello does (HAProxy): the sessions are then
 * stored, found and removed under NAME, although OpenSSL calls the callbacks of the first.
 *
 * --threads T runs T accept loops in each worker, on one SSL_CTX (default: 4 per CPU in all,
 * split over the workers; see default_loops). With `--workers 1 --threads N --no-share` that
 * is the in-process ideal the benchmarks compare against (bench/run.sh): N handshakes at
 * once, one OpenSSL cache, no inter-process traffic.
 *
 * Every response body is one line:
 *   GET /       -> "worker <pid> reused <0|1> proto <TLS version>"
 *   GET /stats  -> "stats role=.. master_valid=.. hits=.. misses=.. stores=.. entries=..
 *                   w_gets=.. w_hits=.. w_timeouts=.. remote_state=.. remote_hits=..
 *                   remote_misses=.. remote_errors=.. remote_open_failures=.. remote_stores=..
 *                   w_replica_hits=.. w_replica_decoded_hits=.. sync_records=.. sync_drops=..
 *                   w_tickets_opened=.. ticket_mode=.."
 *                   (one line; remote_* are the Redis tier's, turned on by CTS_REMOTE and
 *                   CTS_REMOTE_KEY_FILE in the environment; ticket_mode is what
 *                   cts_ticket_mode says of this worker's SSL_CTX: CTS_TICKETS_*)
 *
 * The one rule every server using the library must follow: shut a connection down
 * (SSL_shutdown) before SSL_free. SSL_free on a connection that was not shut down makes
 * OpenSSL remove its session, and with a shared cache that removal is cluster-wide.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <netinet/in.h>
#ifdef __linux__
#include <linux/filter.h>
#endif
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "cluster_tls_store.h"

#define MAX_WORKERS 256
#define MAX_THREADS 256
#define REQUEST_MAX 8192
#define LISTEN_BACKLOG 128
/* How long the master waits for every worker to be ready to accept. */
#define READY_TIMEOUT_MS 30000

/* Each connection's whole budget, from its accept to its close (--deadline-ms). The sockets'
 * timeouts (IO_TIMEOUT_MS) bound one wait each, so a client that sends a byte every second
 * or so would hold an accept loop for as long as it likes (its handshake, a request of up to
 * REQUEST_MAX bytes, the linger), and a few such clients would stop a worker. Past the
 * deadline the next read fails and the connection is dropped: a loop is held at most the
 * deadline plus one IO_TIMEOUT_MS. */
#define CONN_DEADLINE_MS 10000

struct options {
    int port;
    int workers;
    const char *cert;
    const char *key;
    const char *ns;
    const char *switch_ns; /* NULL: one SSL_CTX */
    int share;
    int tickets;
    int tls12;
    int threads;
    int reuseport; /* a listening socket per worker (--reuseport, --sticky) */
    int sticky;
    long get_timeout_us; /* -1: library default */
    long deadline_ms;
};

static volatile sig_atomic_t stop_signal = 0;

static void on_stop(int sig) { stop_signal = sig; }

/* Only there so that SIGCHLD interrupts sigsuspend(); the reaping happens in the loop. */
static void on_child(int sig) { (void)sig; }

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s --port P --workers N --cert FILE --key FILE [--no-share] [--no-tickets]\n"
            "          [--tls12] [--ns NAME] [--get-timeout-us N] [--threads T] [--reuseport]\n"
            "          [--sticky] [--deadline-ms MS] [--switch-ns NAME]\n",
            argv0);
}

static int parse_long(const char *s, long min, long max, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* Accept loops per worker when --threads is not given: LOOPS_PER_CPU for each CPU this process
 * may run on, in all, split over the workers (rounded up; at least one each). A loop serves
 * one connection at a time and sleeps while its client computes, so the best count follows
 * the clients in flight: about one loop per two of them on this 2-CPU machine, on the shared
 * socket as in one process. Against nginx (TLS 1.3, N=4, interleaved, shared listening
 * sockets both), 1 / 2 / 4 loops per worker made 1.05 / 1.01 / 1.01 of its resumed
 * handshakes/s with 8 clients, 0.98 / 1.00 / 0.98 with 16, 0.94 / 1.02 / 1.12 with 32: too
 * few loops cost more than too many, so the default is the count that held with each
 * (docs/PERFORMANCE.md). With --reuseport, each worker draws connections at random, so a
 * worker whose loops are all busy queues one while another idles; there with 8 clients at
 * N=2 the example made 0.88 (TLS 1.2) and 0.91 (TLS 1.3) of nginx's resumed handshakes/s
 * with one loop per worker, 1.10 and 1.06 with 4. (Those counts were measured with every loop
 * in accept4; since one loop per worker waits there at a time, a serial client is served by
 * one warm loop per worker whatever the count, and more loops cost it nothing.) */
#define LOOPS_PER_CPU 4

static int default_loops(int workers)
{
    long cpus = 0;
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        cpus = CPU_COUNT(&set);
#endif
    if (cpus <= 0)
        cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus <= 0)
        cpus = 1;
    long loops = (LOOPS_PER_CPU * cpus + workers - 1) / workers;
    return (int)(loops < 1 ? 1 : loops > MAX_THREADS ? MAX_THREADS : loops);
}

static int parse_args(int argc, char **argv, struct options *o)
{
    long v;
    memset(o, 0, sizeof *o);
    o->port = -1;
    o->workers = -1;
    o->share = 1;
    o->tickets = 1;
    o->threads = 0; /* not given: default_loops() */
    o->get_timeout_us = -1;
    o->deadline_ms = CONN_DEADLINE_MS;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--no-share") == 0) {
            o->share = 0;
        } else if (strcmp(a, "--no-tickets") == 0) {
            o->tickets = 0;
        } else if (strcmp(a, "--tls12") == 0) {
            o->tls12 = 1;
        } else if (strcmp(a, "--reuseport") == 0) {
            o->reuseport = 1;
        } else if (strcmp(a, "--sticky") == 0) {
            o->sticky = 1;
            o->reuseport = 1;
        } else if (next == NULL) {
            fprintf(stderr, "unknown option or missing value: %s\n", a);
            return -1;
        } else if (strcmp(a, "--port") == 0) {
            if (parse_long(next, 0, 65535, &v) != 0) {
                fprintf(stderr, "bad --port: %s\n", next);
                return -1;
            }
            o->port = (int)v;
            i++;
        } else if (strcmp(a, "--workers") == 0) {
            if (parse_long(next, 1, MAX_WORKERS, &v) != 0) {
                fprintf(stderr, "bad --workers (1..%d): %s\n", MAX_WORKERS, next);
                return -1;
            }
            o->workers = (int)v;
            i++;
        } else if (strcmp(a, "--threads") == 0) {
            if (parse_long(next, 1, MAX_THREADS, &v) != 0) {
                fprintf(stderr, "bad --threads (1..%d): %s\n", MAX_THREADS, next);
                return -1;
            }
            o->threads = (int)v;
            i++;
        } else if (strcmp(a, "--get-timeout-us") == 0) {
            if (parse_long(next, 0, 0xffffffffL, &v) != 0) {
                fprintf(stderr, "bad --get-timeout-us: %s\n", next);
                return -1;
            }
            o->get_timeout_us = v;
            i++;
        } else if (strcmp(a, "--deadline-ms") == 0) {
            if (parse_long(next, 1, 3600000L, &v) != 0) {
                fprintf(stderr, "bad --deadline-ms (1..3600000): %s\n", next);
                return -1;
            }
            o->deadline_ms = v;
            i++;
        } else if (strcmp(a, "--cert") == 0) {
            o->cert = next;
            i++;
        } else if (strcmp(a, "--key") == 0) {
            o->key = next;
            i++;
        } else if (strcmp(a, "--ns") == 0) {
            o->ns = next;
            i++;
        } else if (strcmp(a, "--switch-ns") == 0) {
            o->switch_ns = next;
            i++;
        } else {
            fprintf(stderr, "unknown option: %s\n", a);
            return -1;
        }
    }
    if (o->port < 0 || o->workers < 0 || o->cert == NULL || o->key == NULL) {
        fprintf(stderr, "--port, --workers, --cert and --key are required\n");
        return -1;
    }
    if (o->threads == 0)
        o->threads = default_loops(o->workers);
    return 0;
}

static void print_cts_error(const char *what, cts_result rc)
{
    char detail[256];
    size_t n = cts_last_error(detail, sizeof detail);
    fprintf(stderr, "[%ld] %s failed: %s (%d)%s%s\n", (long)getpid(), what, cts_strerror(rc), (int)rc,
            n > 0 ? ": " : "", n > 0 ? detail : "");
}

/* A TCP socket on 127.0.0.1:port with SO_REUSEADDR (and SO_REUSEPORT if asked), bound but
 * not listening. */
static int bound_socket(int port, int reuseport)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("socket");
        return -1;
    }
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)) {
        perror("setsockopt");
        close(fd);
        return -1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("bind");
        close(fd);
        return -1;
    }
    return fd;
}

static int bound_port(int fd)
{
    struct sockaddr_in addr;
    socklen_t len = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &len) != 0) {
        perror("getsockname");
        return -1;
    }
    return ntohs(addr.sin_port);
}

/* Receive and send timeout of every connection (set on the listening socket, inherited). */
#define IO_TIMEOUT_MS 2000

static long conn_deadline_ms = CONN_DEADLINE_MS; /* --deadline-ms */

/* Milliseconds on a coarse monotonic clock (no system call: the vDSO, a few ns). */
static long long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int set_timeouts(int fd, long ms)
{
    struct timeval tv;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0)
        return -1;
    return 0;
}

/* --switch-ns: every connection moves to the context `arg` before anything else is done
 * with its ClientHello. */
static int switch_ctx(SSL *ssl, int *alert, void *arg)
{
    (void)alert;
    return SSL_set_SSL_CTX(ssl, (SSL_CTX *)arg) != NULL ? SSL_CLIENT_HELLO_SUCCESS : SSL_CLIENT_HELLO_ERROR;
}

static SSL_CTX *make_ctx(const struct options *o)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL)
        goto fail;
    if (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    if (o->tls12 && SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION) != 1)
        goto fail;
    /* Read whole TLS records (and what follows them) in one read(2), instead of a header
     * and then a body: half the reads per handshake. nginx does the same. */
    SSL_CTX_set_read_ahead(ctx, 1);
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
    /* A client that closes its socket without a close_notify (openssl s_time, many HTTP
     * clients) is, for OpenSSL 3, a fatal "unexpected eof", and a fatal alert removes the
     * session, here from every worker: such a client would never resume. Since TLS 1.1 an
     * improper close no longer forbids resumption (RFC 5246, 7.2.1). With this option the
     * EOF reads as a close_notify. That is safe here: the requests are GETs (a cut-off one
     * cannot become a different request that does harm) and the replies carry
     * Content-Length (a client sees a cut-off reply as cut off). A server whose requests
     * carry bodies must treat an EOF inside one as an error. */
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
    if (!o->tickets) {
        /* TLS 1.2: session ids only. TLS 1.3: stateful tickets, whose state lives in the
         * (shared) session cache, so they resume on any worker. */
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    }
    return ctx;
fail:
    fprintf(stderr, "[%ld] cannot build the SSL_CTX:\n", (long)getpid());
    ERR_print_errors_fp(stderr);
    SSL_CTX_free(ctx);
    return NULL;
}

/* A worker's SSL_CTX, shared under namespace `ns` unless --no-share; the worker exits if
 * either fails. */
static SSL_CTX *make_worker_ctx(const struct options *o, const char *ns)
{
    SSL_CTX *ctx = make_ctx(o);
    if (ctx == NULL)
        exit(1);
    if (o->share) {
        cts_result rc = cts_share_sessions(ctx, ns);
        if (rc != CTS_OK) {
            print_cts_error("cts_share_sessions", rc);
            exit(1);
        }
    }
    return ctx;
}

/* Reads the request up to the end of its headers. Returns 0 when the server should answer
 * (complete request, the client stopped sending after a part of one, or nothing came within
 * the receive timeout: `openssl s_client` may send nothing and still wait for an answer),
 * 1 when the client closed without asking anything (`openssl s_time` without -www does,
 * right after its handshake), -1 when the connection failed. */
static int read_request(SSL *ssl, char *buf, size_t cap)
{
    size_t len = 0;
    buf[0] = '\0';
    while (len + 1 < cap) {
        int n = SSL_read(ssl, buf + len, (int)(cap - 1 - len));
        if (n > 0) {
            len += (size_t)n;
            buf[len] = '\0';
            if (strstr(buf, "\r\n\r\n") != NULL)
                return 0;
            continue;
        }
        switch (SSL_get_error(ssl, n)) {
        case SSL_ERROR_WANT_READ: /* SO_RCVTIMEO expired */
            ERR_clear_error();
            return 0;
        case SSL_ERROR_ZERO_RETURN: /* close_notify or EOF: with a request begun, it may still read */
            ERR_clear_error();
            return len > 0 ? 0 : 1;
        default:
            return -1;
        }
    }
    return 0; /* headers too long: answer what we have */
}

static int is_stats_request(const char *req)
{
    const char *sp = strchr(req, ' ');
    if (sp == NULL)
        return 0;
    const char *path = sp + 1;
    size_t plen = strcspn(path, " \r\n?");
    return plen == 6 && strncmp(path, "/stats", 6) == 0;
}

static void stats_body(const SSL_CTX *ctx, char *body, size_t cap)
{
    cts_stats st;
    cts_result rc = cts_get_stats(&st);
    if (rc != CTS_OK) {
        snprintf(body, cap, "stats error=%d %s\n", (int)rc, cts_strerror(rc));
        return;
    }
    snprintf(body, cap,
             "stats role=%" PRIu32 " master_valid=%" PRIu32 " hits=%" PRIu64 " misses=%" PRIu64
             " stores=%" PRIu64 " entries=%" PRIu64 " w_gets=%" PRIu64 " w_hits=%" PRIu64
             " w_timeouts=%" PRIu64 " remote_state=%" PRIu64 " remote_hits=%" PRIu64
             " remote_misses=%" PRIu64 " remote_errors=%" PRIu64 " remote_open_failures=%" PRIu64
             " remote_stores=%" PRIu64 " w_replica_hits=%" PRIu64 " w_replica_decoded_hits=%" PRIu64
             " sync_records=%" PRIu64
             " sync_drops=%" PRIu64 " w_tickets_opened=%" PRIu64 " ticket_mode=%" PRIu32 "\n",
             st.role, st.master_valid, st.master.hits, st.master.misses, st.master.stores,
             st.master.entries, st.worker.gets, st.worker.hits, st.worker.timeouts,
             st.master.remote_state, st.master.remote_hits, st.master.remote_misses,
             st.master.remote_errors, st.master.remote_open_failures, st.master.remote_stores,
             st.worker.replica_hits, st.worker.replica_decoded_hits, st.master.sync_records,
             st.master.sync_drops,
             st.worker.tickets_opened, cts_ticket_mode(ctx));
}

static int write_all(SSL *ssl, const char *buf, size_t len)
{
    while (len > 0) {
        int n = SSL_write(ssl, buf, (int)len);
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/*
 * Coalesced writes. OpenSSL writes each handshake flight, the TLS 1.3 session ticket, the
 * reply and the close_notify with one write(2) each, and each becomes a TCP segment the
 * client must take in. Here every write goes into a per-connection buffer, which is sent in
 * one send(2) when OpenSSL flushes (the end of a flight, the close_notify), when the server
 * turns to reading (the peer cannot answer what it has not been sent), when it is full, and
 * once at the end. The one flush held is the TLS 1.3 session ticket's: it goes with the
 * reply. A resumed TLS 1.3 connection whose client sends its request with its Finished then
 * costs two sends instead of four: the server's flight, then ticket, reply and close_notify
 * together.
 *
 * The flight must leave at OpenSSL's flush, not at the next read: a TLS 1.3 server flushes
 * its flight and only then derives the application traffic keys, before it reads the
 * client's Finished, so a flight held until the read waits for that work while the client
 * could already be computing. Held that way (as this example once did), the
 * ClientHello-to-flight time of a resumption was 272 us against 234 us sent at the flush
 * (tcpdump medians, one worker, `openssl s_time -reuse`; nginx 240 us), and `s_time -reuse`
 * made 0.95-0.97 of nginx's connections/s against 0.99-1.02 (docs/PERFORMANCE.md).
 */
#define OUT_MAX 8192

struct conn_io {
    int fd;
    long long deadline; /* mono_ms() past which reads fail (conn_deadline_ms from the accept) */
    int eof;    /* recv returned 0 */
    int owe_ack; /* received since the last send: the peer's last segment may wait for our ACK */
    SSL *ssl;   /* whose writes these are (its state tells a ticket's flush), or NULL */
    size_t len; /* bytes held in out */
    unsigned char out[OUT_MAX];
};

/* All of `len` bytes, however many send(2) it takes. 0 on success, -1 on failure (the
 * socket's SO_SNDTIMEO bounds each wait). */
static int send_all(int fd, const void *data, size_t len)
{
    const unsigned char *p = data;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Sends what is held (and holds nothing after, sent or not). 0 on success or nothing held,
 * -1 on failure. */
static int io_flush(struct conn_io *io)
{
    if (io->len > 0)
        io->owe_ack = 0; /* the data carries it */
    int rc = send_all(io->fd, io->out, io->len);
    io->len = 0;
    return rc;
}

static int io_bio_write(BIO *b, const char *data, int len)
{
    struct conn_io *io = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    if ((size_t)len > OUT_MAX - io->len && io_flush(io) != 0)
        return -1;
    if ((size_t)len > OUT_MAX) { /* larger than the buffer (nothing is held now): straight out */
        io->owe_ack = 0;
        return send_all(io->fd, data, (size_t)len) == 0 ? len : -1;
    }
    memcpy(io->out + io->len, data, (size_t)len);
    io->len += (size_t)len;
    return len;
}

static int io_bio_read(BIO *b, char *buf, int len)
{
    struct conn_io *io = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    if (mono_ms() > io->deadline) {
        errno = ETIMEDOUT; /* not a retry: the connection fails (see CONN_DEADLINE_MS) */
        return -1;
    }
    /* The peer answers only what it has: send what is held before waiting for it. */
    if (io_flush(io) != 0)
        return -1;
    ssize_t n = -1;
#ifdef TCP_QUICKACK
    if (io->owe_ack) {
        /* We are about to wait with nothing sent since the peer's last segment: a resumed
         * TLS 1.2 handshake, which ends with the client's Finished, or a request that came
         * in pieces. Linux delays the ACK of that segment (up to 40 ms once our flight has
         * put the connection in its interactive mode), and a client that writes with Nagle
         * on (no TCP_NODELAY: Python's ssl, many libraries) holds its next segment, the
         * request, until that ACK. Measured with such a client (Python's ssl, 4 processes,
         * TLS 1.2 resumptions): 91 connections/s for this example and for nginx alike,
         * 40 ms each. So when the wait would block, ACK now. Costs nothing when the data is
         * already here (the one recv below), two system calls before a sleep otherwise. */
        n = recv(io->fd, buf, (size_t)len, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int one = 1;
            (void)setsockopt(io->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
            n = recv(io->fd, buf, (size_t)len, 0);
        }
    } else
#endif
        n = recv(io->fd, buf, (size_t)len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        /* SO_RCVTIMEO expired (or a signal): the caller sees SSL_ERROR_WANT_READ. */
        BIO_set_retry_read(b);
        return -1;
    }
    if (n == 0)
        io->eof = 1;
    else if (n > 0)
        io->owe_ack = 1;
    return (int)n;
}

static long io_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct conn_io *io = BIO_get_data(b);
    (void)num;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        /* Sent now (see above), but a TLS 1.3 session ticket waits for the reply. */
        if (io->ssl != NULL && SSL_get_state(io->ssl) == TLS_ST_SW_SESSION_TICKET)
            return 1;
        return io_flush(io) == 0 ? 1 : 0;
    case BIO_CTRL_WPENDING:
        return (long)io->len;
    case BIO_CTRL_PENDING:
        return 0;
    case BIO_CTRL_EOF:
        return io->eof;
    case BIO_C_GET_FD:
        if (ptr != NULL)
            *(int *)ptr = io->fd;
        return io->fd;
    default:
        return 0;
    }
}

static int io_bio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static BIO_METHOD *io_method;

/* Made once, before any accept loop runs. */
static int io_method_init(void)
{
    int type = BIO_get_new_index();
    if (type == -1)
        return -1;
    io_method = BIO_meth_new(type | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR, "coalescing socket");
    if (io_method == NULL || BIO_meth_set_write(io_method, io_bio_write) != 1 ||
        BIO_meth_set_read(io_method, io_bio_read) != 1 || BIO_meth_set_ctrl(io_method, io_bio_ctrl) != 1 ||
        BIO_meth_set_create(io_method, io_bio_create) != 1)
        return -1;
    return 0;
}

static void serve_connection(SSL_CTX *ctx, int fd)
{
    struct conn_io io;
    char req[REQUEST_MAX]; /* on the stack: several accept loops may serve at once */
    char body[1024];
    char resp[1536];

    /* The socket's timeouts and TCP_NODELAY come from the listening socket (start_listening). */
    io.fd = fd;
    io.deadline = mono_ms() + conn_deadline_ms;
    io.eof = 0;
    io.owe_ack = 0;
    int handshake_done = 0;
    io.len = 0;
    SSL *ssl = SSL_new(ctx);
    io.ssl = ssl;
    if (ssl == NULL)
        goto out;
    BIO *bio = BIO_new(io_method);
    if (bio == NULL)
        goto out;
    BIO_set_data(bio, &io);
    SSL_set_bio(ssl, bio, bio); /* the SSL owns the BIO now; `io` outlives both */
    if (SSL_accept(ssl) != 1)
        goto out; /* failed handshake: drop the connection (no session was kept) */
    /* From here on the session is good whatever becomes of this connection (RFC 5246, 7.2.1:
     * since TLS 1.1 an improper close does not forbid resumption; nginx keeps these sessions
     * too). SSL_free removes the session of a connection not marked shut down, and with a
     * shared cache that removal reaches every worker, so every way out marks it. A fatal
     * alert (a forged record, say) still removes the session: OpenSSL does that itself. */
    handshake_done = 1;
    int asked = read_request(ssl, req, sizeof req);
    if (asked != 0)
        goto out; /* failed, or the client left without asking: nothing to answer */

    if (is_stats_request(req))
        stats_body(ctx, body, sizeof body);
    else
        snprintf(body, sizeof body, "worker %ld reused %d proto %s\n", (long)getpid(),
                 SSL_session_reused(ssl) ? 1 : 0, SSL_get_version(ssl));
    int rlen = snprintf(resp, sizeof resp,
                        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                        "Content-Length: %zu\r\n\r\n%s",
                        strlen(body), body);
    if (rlen < 0 || (size_t)rlen >= sizeof resp || write_all(ssl, resp, (size_t)rlen) != 0)
        goto out;

    /* Our close_notify. We do not wait for the client's (it may never send one). It is held
     * with the reply (and often the TLS 1.3 ticket), and they leave together in the flush
     * below. */
    (void)SSL_shutdown(ssl);

out:
    /* What is still held (the reply, or an alert) goes out first. */
    ERR_clear_error();
    (void)io_flush(&io);
    if (handshake_done && ssl != NULL)
        SSL_set_shutdown(ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN); /* keeps the session */
    SSL_free(ssl);
    /* Closing with unread bytes in our receive buffer (a close_notify or data the client
     * sent before it read our reply) sends a RST, which can destroy the reply in flight.
     * So if the client has sent something we have not read, linger for its close, reading
     * what comes (bounded by SO_RCVTIMEO and 64 KiB). If it has sent nothing, close now, as
     * nginx does: what a client sends after this is, in an HTTP/1.0 exchange, its answer to
     * our close_notify, which it read after the reply, so the RST costs it nothing. (A
     * client that sends more while its reply is still in flight may lose the reply to the
     * RST; nginx takes that risk too, and Linux clients read what arrived before a RST.)
     * Waiting for the close in every case, as this example did, cost a sleep and a wake-up
     * per connection: against the same server with `openssl s_time -reuse` (TLS 1.3, 4
     * workers, 14 rotating runs), 8 % more connections/s and 7 % less server CPU per
     * connection without it. */
    if (shutdown(fd, SHUT_WR) == 0) {
        char sink[4096];
        size_t total = 0;
        int flags = MSG_DONTWAIT; /* the first look only: nothing pending means close now */
        for (;;) {
            ssize_t n = recv(fd, sink, sizeof sink, flags);
            if (n <= 0)
                break;
            flags = 0;
            total += (size_t)n;
            if (total > 65536 || mono_ms() > io.deadline)
                break;
        }
    }
    close(fd);
}

/* A worker's accept loops.
 * - On the shared listening socket (the default) one loop of each worker at a time waits in
 *   accept4, the worker's acceptor; its other idle loops wait for their turn (struct
 *   accept_turn). The kernel hands a connection to the acceptor that has waited longest, so a
 *   client's consecutive connections go round the workers, and a client that resumes usually
 *   lands on a worker that did not make its session. The acceptor gives up its turn as it
 *   accepts, and wakes an idle loop of its worker only when more connections wait; otherwise
 *   the loop that finishes a connection first takes the turn back, most often the one that
 *   just served. So a serial client's connections are served by one warm loop per worker,
 *   and under load every idle loop is soon in accept4 again.
 *   Measured (docs/PERFORMANCE.md) against every loop of every worker blocked in accept4
 *   (the kernel then wakes the loop that waited longest, a cold one each time): `openssl
 *   s_time -reuse`, TLS 1.3, 2 workers of 4 loops, rotating rounds against nginx: 1.022 of
 *   its connections/s (20 rounds) against 0.964-0.988 (one loop per worker: 1.007-1.021);
 *   loadgen, new / previous: 8 clients 0.990-1.027 at N=2 and N=4, TLS 1.2 and 1.3; 3
 *   clients 1.051; 32 clients 0.976-0.986 at N=4.
 * - With --reuseport one loop blocks in accept4 on the worker's own socket, and several wait
 *   in epoll_wait on one epoll instance that watches the (non-blocking) socket with
 *   EPOLLONESHOT: a connection wakes one loop, which accepts it and re-arms the watch (which
 *   wakes another loop at once if more connections wait) before serving. epoll wakes the loop
 *   that began waiting last, so the loop that just finished a connection takes the next one.
 *   Measured with `openssl s_time -reuse` (one client, TLS 1.3, 2 workers of 4 loops, 16
 *   rounds against nginx): 0.898 of nginx's connections/s in turn, 0.941 most-recent-first,
 *   0.961 with one loop per worker (docs/PERFORMANCE.md). The shared socket must not be
 *   made non-blocking: its flags are the master's and every worker's. */

/* How often an idle loop that is not the acceptor checks the turn (accept_turn_take): an
 * acceptor that took a connection with none waiting behind it wakes nobody, and if that
 * connection then holds it (a silent client, up to the connection's deadline), the worker's
 * other loops take over within two checks instead of leaving the worker deaf. One idle loop
 * of each worker makes the checks, so an idle worker wakes 10 times a second. Measured idle,
 * 2 workers of 4 loops, CPU time a second in all: 1.0 ms; 3.5 ms with checks every 20 ms,
 * 6.9 ms with every idle loop checking every 20 ms, 0.3 ms with every loop in accept4 (whose
 * 2 s timeout wakes each loop). */
#ifndef TURN_RECHECK_MS
#define TURN_RECHECK_MS 100
#endif

/* Whose turn it is to wait in accept4, among one worker's loops on the shared socket. */
struct accept_turn {
    pthread_mutex_t lock;
    pthread_cond_t vacant; /* signalled when the acceptor leaves connections waiting */
    int taken;              /* a loop is the acceptor */
    int idle;               /* loops waiting for the turn */
    unsigned long accepts;  /* turns left so far */
    int watched;            /* an idle loop checks the turn every TURN_RECHECK_MS */
};

struct accept_loop {
    SSL_CTX *ctx;
    int lfd;
    int ep; /* the worker's epoll instance, or -1: the shared socket, one acceptor at a time */
    struct accept_turn turn;
};

/* 0, or an error number. */
static int accept_turn_init(struct accept_turn *t)
{
    pthread_condattr_t attr;
    int err = pthread_condattr_init(&attr);
    if (err != 0)
        return err;
    err = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (err == 0)
        err = pthread_cond_init(&t->vacant, &attr);
    pthread_condattr_destroy(&attr);
    if (err == 0)
        err = pthread_mutex_init(&t->lock, NULL);
    t->taken = 0;
    t->idle = 0;
    t->accepts = 0;
    t->watched = 0;
    return err;
}

/* Waits for the worker's turn to wait in accept4, and takes it. A loop that is done with a
 * connection takes a vacant turn at once: an acceptor that woke nobody as it accepted (none
 * waiting behind) comes back for the turn itself after serving. An idle loop takes a turn
 * left vacant only when woken for it (connections wait), or when two of its checks in a row
 * found it vacant with no accept in between: the acceptor's connection holds it (a silent
 * client, up to the connection's deadline). So the loops do not trade the turn in a
 * connection's ordinary time, and a held acceptor is taken over within 2 * TURN_RECHECK_MS.
 * One idle loop at a time makes the checks (the watch); the others sleep until woken. */
static void accept_turn_take(struct accept_turn *t)
{
    pthread_mutex_lock(&t->lock);
    int strikes = 0; /* checks in a row that found the turn vacant, since accept `seen` */
    unsigned long seen = t->accepts;
    int watching = 0;
    while (t->taken || strikes == 1) {
        if (!t->watched) {
            t->watched = 1;
            watching = 1;
        }
        t->idle++;
        int r;
        if (watching) {
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            until.tv_sec += TURN_RECHECK_MS / 1000;
            until.tv_nsec += TURN_RECHECK_MS % 1000 * 1000000L;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec += 1;
                until.tv_nsec -= 1000000000L;
            }
            r = pthread_cond_timedwait(&t->vacant, &t->lock, &until);
        } else {
            r = pthread_cond_wait(&t->vacant, &t->lock);
        }
        t->idle--;
        if (r != ETIMEDOUT || t->taken) {
            strikes = 0; /* woken (connections wait: take the turn if vacant), or taken */
        } else if (strikes == 1 && t->accepts == seen) {
            strikes = 2;
        } else {
            strikes = 1;
            seen = t->accepts;
        }
    }
    t->taken = 1;
    /* The watch passes to another idle loop, which wakes and takes it up. */
    int pass_watch = watching && t->idle > 0;
    if (watching)
        t->watched = 0;
    pthread_mutex_unlock(&t->lock);
    if (pass_watch)
        pthread_cond_signal(&t->vacant);
}

/* Leaves the turn (the acceptor has accepted, or failed to), waking an idle loop of the
 * worker only when more connections are waiting to be accepted. */
static void accept_turn_leave(struct accept_turn *t, int lfd)
{
    pthread_mutex_lock(&t->lock);
    t->taken = 0;
    t->accepts++;
    int idle = t->idle;
    pthread_mutex_unlock(&t->lock);
    struct pollfd p = {.fd = lfd, .events = POLLIN};
    if (idle > 0 && poll(&p, 1, 0) > 0)
        pthread_cond_signal(&t->vacant);
}

static void *accept_loop(void *arg)
{
    struct accept_loop *al = arg;
    for (;;) {
        if (al->ep >= 0) {
            struct epoll_event ev;
            int n = epoll_wait(al->ep, &ev, 1, -1);
            if (n <= 0)
                continue; /* EINTR */
        } else {
            accept_turn_take(&al->turn);
        }
        /* Blocking or not, accepted sockets are blocking (Linux does not pass O_NONBLOCK
         * on) and inherit the listening socket's timeouts and TCP_NODELAY. */
        int cfd = accept4(al->lfd, NULL, NULL, SOCK_CLOEXEC);
        int err = errno;
        if (al->ep >= 0) {
            struct epoll_event re = {.events = EPOLLIN | EPOLLONESHOT, .data.fd = al->lfd};
            if (epoll_ctl(al->ep, EPOLL_CTL_MOD, al->lfd, &re) != 0) {
                perror("epoll_ctl"); /* no loop would ever be woken again */
                exit(1);
            }
        } else {
            accept_turn_leave(&al->turn, al->lfd);
        }
        if (cfd < 0) {
            if (err == EINTR || err == ECONNABORTED || err == EAGAIN)
                continue;
            errno = err;
            perror("accept");
            sleep(1); /* e.g. EMFILE: do not spin */
            continue;
        }
        serve_connection(al->ctx, cfd);
    }
    return NULL;
}

/* Sets up the shared wait of several accept loops (see struct accept_loop); 0 or -1. */
static int accept_loops_share_epoll(struct accept_loop *al)
{
    int fl = fcntl(al->lfd, F_GETFL);
    if (fl < 0 || fcntl(al->lfd, F_SETFL, fl | O_NONBLOCK) != 0)
        return -1;
    al->ep = epoll_create1(EPOLL_CLOEXEC);
    if (al->ep < 0)
        return -1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.fd = al->lfd};
    return epoll_ctl(al->ep, EPOLL_CTL_ADD, al->lfd, &ev);
}

/* --sticky: attach to the port's SO_REUSEPORT group (one program for the whole group; every
 * worker attaches the same one) a classic BPF program that returns `IPv4 source address %
 * workers`, the index of the listening socket to take the connection. SKF_NET_OFF + 12 is
 * the source address in the IPv4 header; BPF_ABS loads it in host order. An index past the
 * group's sockets (while workers are still starting) falls back to the kernel's hash. */
static int steer_by_client_address(int lfd, int workers)
{
#if defined(__linux__) && defined(SO_ATTACH_REUSEPORT_CBPF)
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)(SKF_NET_OFF + 12)),
        BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, (uint32_t)workers),
        BPF_STMT(BPF_RET | BPF_A, 0),
    };
    struct sock_fprog prog = {(unsigned short)(sizeof code / sizeof code[0]), code};
    return setsockopt(lfd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof prog);
#else
    (void)lfd;
    (void)workers;
    errno = ENOTSUP;
    return -1;
#endif
}

/* Makes fd listen, and sets once what on Linux every socket it accepts inherits from it,
 * which saves five system calls per connection (three here, two before the linger):
 * - Timeouts bound every wait: in the handshake, the request, the reply and, when the client
 *   sent something unread, the linger for its close (2 s each; the connection's deadline,
 *   CONN_DEADLINE_MS, bounds them all together). One client at a time per accept loop, so a
 *   silent or slow client must not hold it for long. On the listening socket itself the
 *   receive timeout makes an idle blocking accept4 return EAGAIN every 2 s, which
 *   accept_loop simply retries.
 * - NODELAY: with each flight in one send ("Coalesced writes" above), a build without it
 *   measured the same (s_time and loadgen, TLS 1.2 and 1.3, rate, p50 and p99). It stays so
 *   that two small sends in a row (a ticket, then the reply) are never held by Nagle for a
 *   delayed ACK (40 ms), as nginx's tcp_nodelay does.
 * 0, or -1 after printing why. */
static int start_listening(int fd, int backlog)
{
    if (listen(fd, backlog) != 0) {
        perror("listen");
        return -1;
    }
    int one = 1;
    if (set_timeouts(fd, IO_TIMEOUT_MS) != 0 || setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) {
        perror("setsockopt");
        return -1;
    }
    return 0;
}

/* shared_lfd: the master's listening socket, or -1 with --reuseport (the worker opens its own). */
static void worker_main(const struct options *o, int shared_lfd, int port, int ready_fd)
{
#ifdef __linux__
    /* Do not outlive a master that was killed with SIGKILL. */
    pid_t master = getppid();
    (void)prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != master)
        _exit(1);
#endif
    int lfd = shared_lfd;
    if (lfd < 0) {
        lfd = bound_socket(port, 1);
        if (lfd < 0 || start_listening(lfd, LISTEN_BACKLOG) != 0)
            exit(1);
        if (o->sticky && steer_by_client_address(lfd, o->workers) != 0) {
            perror("--sticky: SO_ATTACH_REUSEPORT_CBPF");
            exit(1);
        }
    }

    if (io_method_init() != 0) {
        fprintf(stderr, "[%ld] cannot make the BIO method\n", (long)getpid());
        exit(1);
    }

    /* The SSL_CTX is made after the fork, as a real prefork server would (the library copes
     * with either order). */
    SSL_CTX *ctx = make_worker_ctx(o, o->ns);
    if (o->switch_ns != NULL) {
        /* Never freed: it serves for the worker's whole life, as the first one does. */
        SSL_CTX *site = make_worker_ctx(o, o->switch_ns);
        SSL_CTX_set_client_hello_cb(ctx, switch_ctx, site);
    }

    /* Extra accept loops (--threads) share the listening socket and the SSL_CTX; the worker
     * ends with its process (SIGTERM), so the threads are never joined. */
    static struct accept_loop al;
    al.ctx = ctx;
    al.lfd = lfd;
    al.ep = -1;
    if (o->threads > 1 && o->reuseport && accept_loops_share_epoll(&al) != 0) {
        perror("epoll");
        exit(1);
    }
    int err = accept_turn_init(&al.turn);
    if (err != 0) {
        fprintf(stderr, "[%ld] accept turn: %s\n", (long)getpid(), strerror(err));
        exit(1);
    }
    for (int t = 1; t < o->threads; t++) {
        pthread_t tid;
        err = pthread_create(&tid, NULL, accept_loop, &al);
        if (err != 0) {
            fprintf(stderr, "[%ld] pthread_create: %s\n", (long)getpid(), strerror(err));
            exit(1);
        }
        pthread_detach(tid);
    }

    char ok = 'R';
    if (write(ready_fd, &ok, 1) != 1)
        exit(1);
    close(ready_fd);

    accept_loop(&al);
}

int main(int argc, char **argv)
{
    struct options o;
    if (parse_args(argc, argv, &o) != 0) {
        usage(argv[0]);
        return 2;
    }

    conn_deadline_ms = o.deadline_ms;

    /* Own process group, so a supervisor (or a test) can signal master and workers at once. */
    (void)setpgid(0, 0);
    signal(SIGPIPE, SIG_IGN);

    /* The listening socket, which the workers inherit; with --reuseport it only reserves the
     * port, and each worker opens its own. */
    int reserve = bound_socket(o.port, o.reuseport);
    if (reserve < 0)
        return 1;
    int port = bound_port(reserve);
    if (port <= 0)
        return 1;
    if (!o.reuseport && start_listening(reserve, LISTEN_BACKLOG * o.workers) != 0)
        return 1;

    /* Block the stop signals and SIGCHLD before anything else, for two reasons:
     * - cts_master_setup() starts the library's cache thread, which inherits this mask. Were
     *   the signals open there, the kernel could deliver a process-directed SIGTERM or
     *   SIGCHLD to that thread, and the main thread would sleep on in sigsuspend().
     * - Until the master waits in sigsuspend(), nothing can slip in between a check of
     *   stop_signal and the wait. */
    sigset_t block, orig;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGCHLD);
    sigprocmask(SIG_BLOCK, &block, &orig);

    if (o.share) {
        cts_config cfg;
        cts_result rc = cts_config_init(&cfg);
        if (rc == CTS_OK && o.get_timeout_us >= 0) {
            cfg.get_timeout_us = (uint32_t)o.get_timeout_us;
        }
        if (rc == CTS_OK)
            rc = cts_master_setup(&cfg);
        if (rc != CTS_OK) {
            print_cts_error("cts_master_setup", rc);
            return 1;
        }
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_child;
    sigaction(SIGCHLD, &sa, NULL);

    int ready[2];
    if (pipe2(ready, O_CLOEXEC) != 0) {
        perror("pipe");
        return 1;
    }

    pid_t pids[MAX_WORKERS];
    int alive = 0;
    for (int i = 0; i < o.workers; i++) {
        fflush(NULL); /* nothing buffered may be written twice */
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            break;
        }
        if (pid == 0) {
            signal(SIGTERM, SIG_DFL);
            signal(SIGINT, SIG_DFL);
            signal(SIGCHLD, SIG_DFL);
            sigprocmask(SIG_SETMASK, &orig, NULL);
            close(ready[0]);
            int shared_lfd = reserve;
            if (o.reuseport) {
                close(reserve);
                shared_lfd = -1;
            }
            worker_main(&o, shared_lfd, port, ready[1]);
            _exit(1);
        }
        pids[alive++] = pid;
    }
    close(ready[1]);

    /* Wait until every worker is ready (one byte each); EOF first means one failed, and a
     * worker that is not up within READY_TIMEOUT_MS (stuck before its accept loops) counts as
     * failed too: the stop signals are blocked until the loop below, so the master must not
     * wait for it for ever. */
    int up = 0;
    long long ready_by = mono_ms() + READY_TIMEOUT_MS;
    while (up < alive) {
        long long left = ready_by - mono_ms();
        struct pollfd pfd = {.fd = ready[0], .events = POLLIN};
        int p = left > 0 ? poll(&pfd, 1, (int)left) : 0;
        if (p < 0 && errno == EINTR)
            continue;
        if (p <= 0)
            break;
        char c;
        ssize_t n = read(ready[0], &c, 1);
        if (n == 1)
            up++;
        else if (n < 0 && errno == EINTR)
            continue;
        else
            break;
    }
    close(ready[0]);

    int status = 0;
    if (up == o.workers) {
        printf("ready port=%d workers=%d loops=%d\n", port, o.workers, o.threads);
        for (int i = 0; i < alive; i++)
            printf("worker pid=%ld\n", (long)pids[i]);
        fflush(stdout);
    } else {
        fprintf(stderr, "only %d of %d workers started; stopping\n", up, o.workers);
        stop_signal = SIGTERM;
        status = 1;
    }

    /* Supervise: reap workers (no respawn), forward SIGTERM/SIGINT, exit when all are gone
     * (with status 1 if they went without being asked: a supervisor should see it). */
    int forwarded = 0;
    for (;;) {
        int st;
        pid_t pid;
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
            for (int i = 0; i < alive; i++) {
                if (pids[i] == pid) {
                    pids[i] = pids[--alive];
                    break;
                }
            }
            if (!stop_signal) {
                if (WIFSIGNALED(st))
                    fprintf(stderr, "worker pid=%ld killed by signal %d (not respawned)\n", (long)pid,
                            WTERMSIG(st));
                else
                    fprintf(stderr, "worker pid=%ld exited with %d (not respawned)\n", (long)pid,
                            WEXITSTATUS(st));
            }
        }
        if (stop_signal && !forwarded) {
            for (int i = 0; i < alive; i++)
                kill(pids[i], stop_signal == SIGINT ? SIGINT : SIGTERM);
            forwarded = 1;
        }
        if (alive == 0) {
            if (!stop_signal) {
                fprintf(stderr, "every worker is gone; the master stops\n");
                status = 1;
            }
            break;
        }
        sigsuspend(&orig);
    }
    close(reserve);
    return status;
}
