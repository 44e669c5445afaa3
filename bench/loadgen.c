/*
 * bench/loadgen.c: the benchmark's load generator in C, a drop-in for bench/loadgen.py.
 *
 * One process, one epoll loop, no threads: many bare WebSocket clients on non-blocking
 * sockets. Same command line (plus --tokens FILE), same control protocol on stdin/stdout and
 * the same JSON answers as loadgen.py; see that file's docstring:
 *
 *   connect N   open N more clients, answer once each is ready (subscribed) or failed
 *   mark        counters since the previous mark (then reset); "mark sub": the same, but
 *               which connections stayed silent is only judged between plain marks
 *   quit        close every socket and exit
 *
 * Frames are read into one large buffer and parsed in place (a partial frame is carried over
 * to the next read); each text frame is scanned, not parsed, for the top-level "type",
 * "symbol", "seq", "ts" and "code" of each object. No allocation per message.
 *
 * pricefeed tokens are not signed here: --tokens FILE holds one JWT a line, line i for client
 * index i (bench/run.py writes it). --jwt-secret and --audience are accepted and ignored.
 *
 * Wake-ups are coalesced: when the previous epoll_wait returned only a few sockets, the loop
 * lets --coalesce-us (default 100 µs) pass since then before the next one. Without it, a
 * server that spreads its sends evenly wakes this process for nearly every message (an
 * epoll_wait and often a context switch each, plus a cross-core wake-up the server pays for);
 * with it, in pricefeed's S2 (100k msg/s) this process used about 12 points of a core less
 * (58-60% -> 46-48%) and the server about 6 less, latency unchanged. A message waits at most
 * that long before it is read: one 0.1 ms histogram bucket, and ticks' ts has 1 ms
 * resolution. --coalesce-us 0 turns it off.
 *
 * Build: gcc -O2 -std=c11 -Wall -Wextra -o loadgen bench/loadgen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Latency histogram: 0.1 ms buckets below 1 s, 10 ms buckets from 1 s to 120 s, the last
 * bucket catches everything above (bucket_upper_ms in loadgen.py). */
#define FINE_BUCKETS 10000
#define LAT_BUCKETS (FINE_BUCKETS + 11900)

#define MAXSYM 64              /* distinct symbols tracked per connection */
#define GBUF_SIZE (256 * 1024) /* the shared read buffer */
#define MAX_FRAME (64u << 20)  /* a frame (or fragmented message) larger than this fails */
#define MAX_HEADER (64 * 1024) /* HTTP upgrade response */
#define MAX_REASONS 64
#define REASON_LEN 128
#define SEQ_NONE INT64_MIN

enum { KIND_PRICEFEED, KIND_BROADCASTER, KIND_SIO };
enum { ST_CONNECTING, ST_HANDSHAKE, ST_OPEN };

/* ------------------------------------------------------------------ small helpers */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec * 1e-6;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

static uint64_t rng_state;

static uint64_t rnd(void) { /* xorshift64* */
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static double rnd_unit(void) { return (double)(rnd() >> 11) * (1.0 / 9007199254740992.0); }

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "loadgen: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return q;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* A growable byte buffer. */
typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static void buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void buf_add(Buf *b, const void *d, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

static void buf_printf(Buf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        size_t room = b->cap - b->len;
        va_start(ap, fmt);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        buf_reserve(b, (size_t)n + 1);
    }
}

/* A JSON string literal; bytes >= 0x80 become '?' so a truncated UTF-8 sequence can never
 * make the answer invalid. */
static void buf_json_str(Buf *b, const char *s, size_t n) {
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') {
            char esc[2] = {'\\', (char)ch};
            buf_add(b, esc, 2);
        } else if (ch < 0x20) {
            buf_printf(b, "\\u%04x", ch);
        } else if (ch >= 0x80) {
            buf_add(b, "?", 1);
        } else {
            buf_add(b, &s[i], 1);
        }
    }
    buf_add(b, "\"", 1);
}

/* reason -> count, in first-seen order */
typedef struct {
    char key[MAX_REASONS][REASON_LEN];
    uint64_t n[MAX_REASONS];
    int len;
} ReasonMap;

static void reason_add(ReasonMap *m, const char *key, size_t maxlen) {
    char k[REASON_LEN];
    size_t n = strlen(key);
    if (n > maxlen)
        n = maxlen;
    if (n > REASON_LEN - 1)
        n = REASON_LEN - 1;
    memcpy(k, key, n);
    k[n] = 0;
    for (int i = 0; i < m->len; i++)
        if (strcmp(m->key[i], k) == 0) {
            m->n[i]++;
            return;
        }
    if (m->len == MAX_REASONS) { /* the last slot collects the rest */
        snprintf(m->key[MAX_REASONS - 1], REASON_LEN, "other");
        m->n[MAX_REASONS - 1]++;
        return;
    }
    snprintf(m->key[m->len], REASON_LEN, "%s", k);
    m->n[m->len++] = 1;
}

static void reason_json(Buf *b, const ReasonMap *m) {
    buf_add(b, "{", 1);
    for (int i = 0; i < m->len; i++) {
        if (i)
            buf_add(b, ",", 1);
        buf_json_str(b, m->key[i], strlen(m->key[i]));
        buf_printf(b, ":%llu", (unsigned long long)m->n[i]);
    }
    buf_add(b, "}", 1);
}

/* ------------------------------------------------------------------ options, state */

static struct {
    int kind;
    int port;
    int per_client;
    int batch;
    int concurrency;
    double ready_timeout;
    const char *tokens_path;
    double coalesce; /* seconds */
} opt = {
    .kind = -1, .per_client = 1, .concurrency = 100, .ready_timeout = 30.0, .coalesce = 1e-4};

static char *syms[MAXSYM]; /* symbol table: --symbols first, then any other seen in a tick */
static size_t symlen[MAXSYM];
static int nsyms, n_arg_syms;

static char **tokens;
static int ntokens;

typedef struct Conn {
    int fd;
    int idx;
    uint8_t state;
    uint8_t ready;
    uint8_t in_job; /* in the current connect job, not ready yet */
    uint8_t in_frag;
    int retries;
    uint64_t got; /* ticks since the last full mark */
    int pos;      /* index in conns[], -1 while the TCP connect is in flight */
    int pend_pos; /* index in job.pending[], -1 when not there */
    int resub_pos;
    double deadline;
    double resub_at;
    uint8_t *carry; /* bytes of an incomplete frame (or the HTTP response) */
    size_t carry_len, carry_cap;
    uint8_t *frag; /* fragmented text message so far */
    size_t frag_len, frag_cap;
    uint8_t *out; /* bytes the socket did not take yet */
    size_t out_len, out_cap;
    uint32_t events; /* epoll interest */
    int64_t last[MAXSYM];
} Conn;

static int ep;
static Conn **conns; /* TCP-connected, live (loadgen.py's self.conns) */
static int nconns, conns_cap;
static Conn **resubs; /* pricefeed connections waiting to subscribe again */
static int nresubs, resubs_cap;

static struct {
    uint64_t frames, ticks, snapshots, gaps, missed, dups, errors, resubscribes;
    double lat_max;
    char error_sample[256];
    uint64_t hist[LAT_BUCKETS];
} st;
static ReasonMap closed_map;
static double mark_at, mark_cpu;

static struct {
    int active;
    int start, end, next;
    int phase; /* 0: broadcaster priming, one at a time; 1: pause after it; 2: the rest */
    int prime_end;
    double sleep_until;
    int in_flight, ok;
    ReasonMap reasons;
    double t0;
    Conn **pending;
    int npending, pending_cap;
} job;
static int next_idx;

static uint8_t gbuf[GBUF_SIZE];
static uint8_t scratch[GBUF_SIZE]; /* unescaped socket.io string payloads */

/* ------------------------------------------------------------------ output */

static void reply(Buf *b) {
    buf_add(b, "\n", 1);
    size_t off = 0;
    while (off < b->len) {
        ssize_t w = write(STDOUT_FILENO, b->p + off, b->len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            exit(1); /* the runner is gone */
        }
        off += (size_t)w;
    }
    free(b->p);
}

/* ------------------------------------------------------------------ connection bookkeeping */

static void conns_add(Conn *c) {
    if (nconns == conns_cap) {
        conns_cap = conns_cap ? conns_cap * 2 : 1024;
        conns = xrealloc(conns, sizeof(*conns) * (size_t)conns_cap);
    }
    c->pos = nconns;
    conns[nconns++] = c;
}

static void conns_remove(Conn *c) {
    if (c->pos < 0)
        return;
    Conn *last = conns[--nconns];
    conns[c->pos] = last;
    last->pos = c->pos;
    c->pos = -1;
}

static void pending_add(Conn *c) {
    if (job.npending == job.pending_cap) {
        job.pending_cap = job.pending_cap ? job.pending_cap * 2 : 256;
        job.pending = xrealloc(job.pending, sizeof(*job.pending) * (size_t)job.pending_cap);
    }
    c->pend_pos = job.npending;
    job.pending[job.npending++] = c;
}

static void pending_remove(Conn *c) {
    if (c->pend_pos < 0)
        return;
    Conn *last = job.pending[--job.npending];
    job.pending[c->pend_pos] = last;
    last->pend_pos = c->pend_pos;
    c->pend_pos = -1;
}

static void resub_add(Conn *c, double at) {
    c->resub_at = at;
    if (c->resub_pos >= 0)
        return;
    if (nresubs == resubs_cap) {
        resubs_cap = resubs_cap ? resubs_cap * 2 : 64;
        resubs = xrealloc(resubs, sizeof(*resubs) * (size_t)resubs_cap);
    }
    c->resub_pos = nresubs;
    resubs[nresubs++] = c;
}

static void resub_remove(Conn *c) {
    if (c->resub_pos < 0)
        return;
    Conn *last = resubs[--nresubs];
    resubs[c->resub_pos] = last;
    last->resub_pos = c->resub_pos;
    c->resub_pos = -1;
}

static void destroy(Conn *c) {
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    conns_remove(c);
    pending_remove(c);
    resub_remove(c);
    free(c->carry);
    free(c->frag);
    free(c->out);
    free(c);
}

/* The connection is done for: before it was ready the reason goes to the connect answer's
 * fail_reasons, after, to the marks' "closed". Frees c. */
static void fail(Conn *c, const char *reason) {
    if (!c->ready) {
        if (c->in_job) {
            reason_add(&job.reasons, reason, 80);
            job.in_flight--;
            c->in_job = 0;
        }
    } else {
        reason_add(&closed_map, reason, REASON_LEN - 1);
    }
    destroy(c);
}

static void set_ready(Conn *c) {
    if (c->ready)
        return;
    c->ready = 1;
    if (c->in_job) {
        c->in_job = 0;
        job.ok++;
        job.in_flight--;
        pending_remove(c);
    }
}

static const char *errno_class(int err) {
    switch (err) {
    case ECONNREFUSED:
        return "ConnectionRefusedError";
    case ECONNRESET:
        return "ConnectionResetError";
    case ECONNABORTED:
        return "ConnectionAbortedError";
    case EPIPE:
    case ESHUTDOWN:
        return "BrokenPipeError";
    case ETIMEDOUT:
        return "TimeoutError";
    default:
        return "OSError";
    }
}

/* A failed TCP connect, worded like loadgen.py's reason for the OSError it would get:
 * str(exc) for a ConnectionError, else the class name (here with the errno added). */
static void fail_connect(Conn *c, int err) {
    char r[REASON_LEN];
    const char *cls = errno_class(err);
    if (err == ETIMEDOUT)
        snprintf(r, sizeof r, "TimeoutError");
    else if (strcmp(cls, "OSError") == 0)
        snprintf(r, sizeof r, "OSError [Errno %d] %s", err, strerror(err));
    else
        snprintf(r, sizeof r, "[Errno %d] %s", err, strerror(err));
    fail(c, r);
}

/* The peer closed or reset the connection. */
static void conn_lost(Conn *c, int err) {
    if (c->state == ST_OPEN) {
        fail(c, "eof");
        return;
    }
    char r[REASON_LEN];
    if (err == 0)
        snprintf(r, sizeof r, "eof before upgrade (None)");
    else
        snprintf(r, sizeof r, "eof before upgrade (%s(%d, '%s'))", errno_class(err), err,
                 strerror(err));
    fail(c, r);
}

static void set_events(Conn *c, uint32_t events) {
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

/* Write what the socket takes now, keep the rest for EPOLLOUT. Errors are left to the read
 * side, which sees the reset or the EOF. */
static void conn_write(Conn *c, const uint8_t *d, size_t n) {
    if (c->out_len == 0) {
        ssize_t w = send(c->fd, d, n, MSG_NOSIGNAL);
        if (w == (ssize_t)n)
            return;
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return;
            w = 0;
        }
        d += w;
        n -= (size_t)w;
    }
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 512;
        while (cap < c->out_len + n)
            cap *= 2;
        c->out = xrealloc(c->out, cap);
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, d, n);
    c->out_len += n;
    set_events(c, EPOLLIN | EPOLLOUT);
}

static void conn_flush(Conn *c) {
    while (c->out_len) {
        ssize_t w = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            c->out_len = 0; /* the read side reports it */
            break;
        }
        memmove(c->out, c->out + w, c->out_len - (size_t)w);
        c->out_len -= (size_t)w;
    }
    set_events(c, EPOLLIN);
}

/* A masked client frame. */
static void send_frame(Conn *c, int opcode, const uint8_t *payload, size_t n) {
    uint8_t stackbuf[4096];
    uint8_t *f = n + 14 <= sizeof stackbuf ? stackbuf : xrealloc(NULL, n + 14);
    size_t h = 0;
    f[h++] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        f[h++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        f[h++] = 0x80 | 126;
        f[h++] = (uint8_t)(n >> 8);
        f[h++] = (uint8_t)n;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            f[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    uint32_t key = (uint32_t)rnd();
    uint8_t *k = f + h;
    memcpy(k, &key, 4);
    h += 4;
    for (size_t i = 0; i < n; i++)
        f[h + i] = payload[i] ^ k[i & 3];
    conn_write(c, f, h + n);
    if (f != stackbuf)
        free(f);
}

static void send_text(Conn *c, const char *s, size_t n) { send_frame(c, 1, (const uint8_t *)s, n); }

/* ------------------------------------------------------------------ per kind: what to send */

static int client_sym(int idx, int j) { /* loadgen.py's client_symbols(idx)[j] */
    return (int)(((long long)idx * opt.per_client + j) % n_arg_syms);
}

static int client_nsyms(void) { return opt.per_client < n_arg_syms ? opt.per_client : n_arg_syms; }

static void add_sym_list(Buf *b, int idx, const char *sep, int quoted) {
    for (int j = 0; j < client_nsyms(); j++) {
        int s = client_sym(idx, j);
        if (j)
            buf_printf(b, "%s", sep);
        if (quoted)
            buf_json_str(b, syms[s], symlen[s]);
        else
            buf_add(b, syms[s], symlen[s]);
    }
}

static void pricefeed_subscribe(Conn *c) {
    Buf b = {0};
    buf_printf(&b, "{\"op\":\"subscribe\",\"symbols\":[");
    add_sym_list(&b, c->idx, ",", 1);
    buf_printf(&b, "]%s}", opt.batch ? ",\"batch\":true" : "");
    send_text(c, b.p, b.len);
    free(b.p);
}

static void sio_subscribe(Conn *c) {
    Buf b = {0};
    buf_printf(&b, "421[\"subscribe\",[");
    add_sym_list(&b, c->idx, ",", 1);
    buf_printf(&b, "]]");
    send_text(c, b.p, b.len);
    free(b.p);
}

static void on_open(Conn *c) {
    if (opt.kind == KIND_PRICEFEED)
        pricefeed_subscribe(c);
    else if (opt.kind == KIND_BROADCASTER)
        set_ready(c);
}

static void send_upgrade(Conn *c) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint8_t raw[18];
    for (int i = 0; i < 18; i += 6) {
        uint64_t r = rnd();
        memcpy(raw + i, &r, 6);
    }
    raw[16] = raw[17] = 0;
    char key[25];
    for (int i = 0, o = 0; i < 18; i += 3) {
        uint32_t v = ((uint32_t)raw[i] << 16) | ((uint32_t)raw[i + 1] << 8) | raw[i + 2];
        key[o++] = b64[(v >> 18) & 63];
        key[o++] = b64[(v >> 12) & 63];
        key[o++] = b64[(v >> 6) & 63];
        key[o++] = b64[v & 63];
    }
    key[22] = key[23] = '='; /* 16 bytes */
    key[24] = 0;
    Buf b = {0};
    buf_printf(&b, "GET ");
    if (opt.kind == KIND_PRICEFEED) {
        buf_printf(&b, "/v1/ws?token=%s", tokens[c->idx]);
    } else if (opt.kind == KIND_BROADCASTER) {
        buf_printf(&b, "/ws/");
        add_sym_list(&b, c->idx, ",", 0);
    } else {
        buf_printf(&b, "/socket.io/?EIO=4&transport=websocket");
    }
    buf_printf(&b,
               " HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
               opt.port, key);
    conn_write(c, (const uint8_t *)b.p, b.len);
    free(b.p);
}

/* ------------------------------------------------------------------ JSON scanning */

typedef struct {
    const uint8_t *type, *sym, *code;
    size_t type_len, sym_len, code_len;
    int64_t seq;
    double ts;
    uint8_t has_type, has_sym, has_seq, has_ts, has_code;
} Msg;

static inline const uint8_t *skip_ws(const uint8_t *p, const uint8_t *e) {
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

/* p at '"': the raw (still escaped) content in *s and *n, returns just past the closing quote. */
static const uint8_t *scan_str(const uint8_t *p, const uint8_t *e, const uint8_t **s, size_t *n) {
    const uint8_t *start = ++p;
    while (p < e) {
        const uint8_t *q = memchr(p, '"', (size_t)(e - p));
        if (!q)
            return NULL;
        size_t bs = 0; /* an odd number of backslashes before it escapes it */
        while (q - bs > start && q[-1 - (ptrdiff_t)bs] == '\\')
            bs++;
        if (bs & 1) {
            p = q + 1;
            continue;
        }
        *s = start;
        *n = (size_t)(q - start);
        return q + 1;
    }
    return NULL;
}

/* Any JSON value: returns just past it, NULL if malformed or cut short. */
static const uint8_t *skip_value(const uint8_t *p, const uint8_t *e) {
    if (p >= e)
        return NULL;
    if (*p == '"') {
        const uint8_t *s;
        size_t n;
        return scan_str(p, e, &s, &n);
    }
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < e) {
            uint8_t ch = *p;
            if (ch == '"') {
                const uint8_t *s;
                size_t n;
                p = scan_str(p, e, &s, &n);
                if (!p)
                    return NULL;
                continue;
            }
            if (ch == '{' || ch == '[')
                depth++;
            else if (ch == '}' || ch == ']') {
                if (--depth == 0)
                    return p + 1;
            }
            p++;
        }
        return NULL;
    }
    const uint8_t *start = p; /* a number or literal */
    while (p < e && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' &&
           *p != '\r' && *p != '\t')
        p++;
    return p == start ? NULL : p;
}

/* An integer, all of [p, e): 1 and *out when it is one. */
static int parse_int(const uint8_t *p, const uint8_t *e, int64_t *out) {
    int neg = 0;
    if (p < e && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= e || e - p > 18)
        return 0;
    int64_t v = 0;
    for (; p < e; p++) {
        if (*p < '0' || *p > '9')
            return 0;
        v = v * 10 + (*p - '0');
    }
    *out = neg ? -v : v;
    return 1;
}

static int parse_num(const uint8_t *p, const uint8_t *e, double *out) {
    int64_t v;
    if (parse_int(p, e, &v)) {
        *out = (double)v;
        return 1;
    }
    char tmp[64];
    size_t n = (size_t)(e - p);
    if (n == 0 || n >= sizeof tmp || !((*p >= '0' && *p <= '9') || *p == '-'))
        return 0;
    memcpy(tmp, p, n);
    tmp[n] = 0;
    char *end;
    double d = strtod(tmp, &end);
    if (*end || d != d)
        return 0;
    *out = d;
    return 1;
}

#define KEYIS(k, n, lit) ((n) == sizeof(lit) - 1 && memcmp((k), (lit), sizeof(lit) - 1) == 0)

/* p at '{': the top-level fields we care about into *m; returns just past the '}'. */
static const uint8_t *scan_obj(const uint8_t *p, const uint8_t *e, Msg *m) {
    memset(m, 0, sizeof *m);
    p++;
    for (;;) {
        p = skip_ws(p, e);
        if (p >= e)
            return NULL;
        if (*p == '}')
            return p + 1;
        if (*p != '"')
            return NULL;
        const uint8_t *k;
        size_t kn;
        p = scan_str(p, e, &k, &kn);
        if (!p)
            return NULL;
        p = skip_ws(p, e);
        if (p >= e || *p != ':')
            return NULL;
        p = skip_ws(p + 1, e);
        const uint8_t *v = p;
        p = skip_value(p, e);
        if (!p)
            return NULL;
        if (kn >= 2 && kn <= 6) {
            if (KEYIS(k, kn, "type")) {
                m->has_type = 1; /* a non-string type is "not tick" */
                m->type = NULL;
                if (*v == '"') {
                    m->type = v + 1;
                    m->type_len = (size_t)(p - v - 2);
                }
            } else if (KEYIS(k, kn, "symbol")) {
                if (*v == '"') {
                    m->has_sym = 1;
                    m->sym = v + 1;
                    m->sym_len = (size_t)(p - v - 2);
                }
            } else if (KEYIS(k, kn, "seq")) {
                m->has_seq = (uint8_t)parse_int(v, p, &m->seq);
            } else if (KEYIS(k, kn, "ts")) {
                m->has_ts = (uint8_t)parse_num(v, p, &m->ts);
            } else if (KEYIS(k, kn, "code")) {
                m->has_code = 1;
                m->code = NULL;
                if (*v == '"') {
                    m->code = v + 1;
                    m->code_len = (size_t)(p - v - 2);
                }
            }
        }
        p = skip_ws(p, e);
        if (p >= e)
            return NULL;
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p == '}')
            return p + 1;
        return NULL;
    }
}

static int str_is(const uint8_t *s, size_t n, const char *lit) {
    size_t l = strlen(lit);
    return s && n == l && memcmp(s, lit, l) == 0;
}

/* Symbol string -> index in syms[], adding one never seen; -1 when the table is full. */
static int sym_index(const uint8_t *s, size_t n) {
    for (int i = 0; i < nsyms; i++)
        if (symlen[i] == n && memcmp(syms[i], s, n) == 0)
            return i;
    if (nsyms == MAXSYM)
        return -1;
    syms[nsyms] = xrealloc(NULL, n + 1);
    memcpy(syms[nsyms], s, n);
    syms[nsyms][n] = 0;
    symlen[nsyms] = n;
    return nsyms++;
}

/* ------------------------------------------------------------------ per message accounting */

static void tick(Conn *c, const Msg *m, double now) {
    st.ticks++;
    c->got++;
    if (!m->has_sym || !m->has_seq)
        return;
    int si = sym_index(m->sym, m->sym_len);
    if (si >= 0) {
        int64_t last = c->last[si];
        if (last != SEQ_NONE) {
            int64_t d = m->seq - last;
            if (d != 1) {
                if (d > 1) {
                    st.gaps++;
                    st.missed += (uint64_t)(d - 1);
                } else {
                    st.dups++;
                    return;
                }
            }
        }
        c->last[si] = m->seq;
    }
    if (!m->has_ts)
        return;
    double lat = now - m->ts;
    if (lat > st.lat_max)
        st.lat_max = lat;
    double x = lat * 10.0;
    int b;
    if (x >= FINE_BUCKETS) {
        double y = (lat - 1000.0) / 10.0;
        b = y >= (double)(LAT_BUCKETS - 1 - FINE_BUCKETS) ? LAT_BUCKETS - 1
                                                          : FINE_BUCKETS + (int)y;
    } else if (x < 0) {
        b = 0;
    } else {
        b = (int)x;
    }
    st.hist[b]++;
}

/* pricefeed's non-tick messages; 1 when the connection was failed (and freed). */
static int pf_other(Conn *c, const Msg *m, const uint8_t *raw, size_t rawlen) {
    if (!m->has_type)
        return 0;
    if (str_is(m->type, m->type_len, "snapshot")) {
        st.snapshots++;
        if (m->has_seq && m->has_sym) {
            int si = sym_index(m->sym, m->sym_len);
            if (si >= 0) {
                int64_t cur = c->last[si] == SEQ_NONE ? 0 : c->last[si];
                c->last[si] = m->seq > cur ? m->seq : cur;
            }
        }
    } else if (str_is(m->type, m->type_len, "subscribed")) {
        set_ready(c);
    } else if (str_is(m->type, m->type_len, "error")) {
        st.errors++;
        size_t n = rawlen < 200 ? rawlen : 200;
        memcpy(st.error_sample, raw, n);
        st.error_sample[n] = 0;
        if (m->has_code && str_is(m->code, m->code_len, "unavailable") && c->retries < 5) {
            /* "retry later": what a real client does, after a jittered pause */
            c->retries++;
            st.resubscribes++;
            resub_add(c, mono() + (0.2 + 0.8 * rnd_unit()) * c->retries);
        } else if (!c->ready) {
            char r[REASON_LEN];
            if (m->has_code && m->code)
                snprintf(r, sizeof r, "error %.*s", (int)(m->code_len > 100 ? 100 : m->code_len),
                         (const char *)m->code);
            else
                snprintf(r, sizeof r, "error None");
            fail(c, r);
            return 1;
        }
    }
    return 0;
}

static int on_text_pricefeed(Conn *c, const uint8_t *p, size_t n, double now) {
    const uint8_t *e = p + n;
    p = skip_ws(p, e);
    if (p >= e)
        return 0;
    Msg m;
    if (*p == '[') {
        p++;
        for (;;) {
            p = skip_ws(p, e);
            if (p >= e || *p == ']')
                return 0;
            const uint8_t *q;
            if (*p == '{') {
                q = scan_obj(p, e, &m);
                if (!q)
                    return 0;
                if (!m.has_type || str_is(m.type, m.type_len, "tick"))
                    tick(c, &m, now);
                else if (pf_other(c, &m, p, (size_t)(q - p)))
                    return 1;
            } else {
                q = skip_value(p, e);
                if (!q)
                    return 0;
            }
            p = skip_ws(q, e);
            if (p < e && *p == ',')
                p++;
            else if (p >= e || *p != ']')
                return 0; /* malformed */
        }
    }
    if (*p != '{')
        return 0;
    const uint8_t *q = scan_obj(p, e, &m);
    if (!q)
        return 0;
    if (m.has_type && str_is(m.type, m.type_len, "tick")) {
        tick(c, &m, now);
        return 0;
    }
    return pf_other(c, &m, p, (size_t)(q - p));
}

static int on_text_broadcaster(Conn *c, const uint8_t *p, size_t n, double now) {
    const uint8_t *e = p + n;
    p = skip_ws(p, e);
    Msg m;
    if (p < e && *p == '{' && scan_obj(p, e, &m) && m.has_type &&
        str_is(m.type, m.type_len, "tick"))
        tick(c, &m, now);
    return 0;
}

/* A JSON string's content (between the quotes) unescaped into out; its length, or -1. */
static long json_unescape(const uint8_t *s, size_t n, uint8_t *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (o + 4 > cap)
            return -1;
        uint8_t ch = s[i];
        if (ch != '\\') {
            out[o++] = ch;
            continue;
        }
        if (++i >= n)
            return -1;
        switch (s[i]) {
        case 'n': out[o++] = '\n'; break;
        case 't': out[o++] = '\t'; break;
        case 'r': out[o++] = '\r'; break;
        case 'b': out[o++] = '\b'; break;
        case 'f': out[o++] = '\f'; break;
        case 'u': { /* BMP only, as UTF-8; enough for the fields we read */
            if (i + 4 >= n)
                return -1;
            unsigned v = 0;
            for (int k = 1; k <= 4; k++) {
                uint8_t h = s[i + (size_t)k];
                v <<= 4;
                if (h >= '0' && h <= '9')
                    v |= h - '0';
                else if ((h | 0x20) >= 'a' && (h | 0x20) <= 'f')
                    v |= (h | 0x20) - 'a' + 10;
                else
                    return -1;
            }
            i += 4;
            if (v < 0x80) {
                out[o++] = (uint8_t)v;
            } else if (v < 0x800) {
                out[o++] = (uint8_t)(0xC0 | (v >> 6));
                out[o++] = (uint8_t)(0x80 | (v & 0x3F));
            } else {
                out[o++] = (uint8_t)(0xE0 | (v >> 12));
                out[o++] = (uint8_t)(0x80 | ((v >> 6) & 0x3F));
                out[o++] = (uint8_t)(0x80 | (v & 0x3F));
            }
            break;
        }
        default: out[o++] = s[i]; break; /* \" \\ \/ */
        }
    }
    return (long)o;
}

static int on_text_sio(Conn *c, const uint8_t *p, size_t n, double now) {
    if (n >= 3 && memcmp(p, "42[", 3) == 0) { /* event: 42["tick",{...}] or 42["tick","{...}"] */
        const uint8_t *e = p + n, *s;
        size_t sn;
        const uint8_t *q = skip_ws(p + 3, e);
        if (q >= e || *q != '"' || !(q = scan_str(q, e, &s, &sn)) || !str_is(s, sn, "tick"))
            return 0;
        q = skip_ws(q, e);
        if (q >= e || *q != ',')
            return 0;
        q = skip_ws(q + 1, e);
        if (q >= e)
            return 0;
        Msg m;
        if (*q == '"') {
            if (!scan_str(q, e, &s, &sn))
                return 0;
            long un = json_unescape(s, sn, scratch, sizeof scratch);
            if (un < 0)
                return 0;
            const uint8_t *t = skip_ws(scratch, scratch + un);
            if (t < scratch + un && *t == '{' && scan_obj(t, scratch + un, &m))
                tick(c, &m, now);
        } else if (*q == '{' && scan_obj(q, e, &m)) {
            tick(c, &m, now);
        }
    } else if (n == 1 && p[0] == '2') { /* engine.io ping -> pong */
        send_text(c, "3", 1);
    } else if (n >= 1 && p[0] == '0') { /* engine.io open -> socket.io connect to "/" */
        send_text(c, "40", 2);
    } else if (n >= 2 && memcmp(p, "40", 2) == 0) { /* namespace connected -> subscribe */
        sio_subscribe(c);
    } else if (n >= 3 && memcmp(p, "431", 3) == 0) {
        set_ready(c);
    } else if (n >= 2 && memcmp(p, "44", 2) == 0) {
        fail(c, "connect_error");
        return 1;
    }
    return 0;
}

static int on_text(Conn *c, const uint8_t *p, size_t n, double now) {
    st.frames++;
    switch (opt.kind) {
    case KIND_PRICEFEED: return on_text_pricefeed(c, p, n, now);
    case KIND_BROADCASTER: return on_text_broadcaster(c, p, n, now);
    default: return on_text_sio(c, p, n, now);
    }
}

/* ------------------------------------------------------------------ WebSocket framing */

#define GONE ((size_t)-1)

/* Complete frames in buf[0..n): handled; returns the bytes used, or GONE when c was failed. */
static size_t ws_frames(Conn *c, uint8_t *buf, size_t n, double now) {
    size_t pos = 0;
    while (n - pos >= 2) {
        uint8_t b0 = buf[pos], b1 = buf[pos + 1];
        uint64_t ln = b1 & 0x7F;
        size_t hdr = 2;
        if (ln == 126) {
            if (n - pos < 4)
                break;
            ln = ((uint64_t)buf[pos + 2] << 8) | buf[pos + 3];
            hdr = 4;
        } else if (ln == 127) {
            if (n - pos < 10)
                break;
            ln = 0;
            for (int i = 2; i < 10; i++)
                ln = (ln << 8) | buf[pos + (size_t)i];
            hdr = 10;
        }
        if (ln > MAX_FRAME) {
            fail(c, "frame too large");
            return GONE;
        }
        size_t mask_at = 0;
        if (b1 & 0x80) { /* servers do not mask; cope anyway */
            mask_at = pos + hdr;
            hdr += 4;
        }
        if (n - pos < hdr || ln > n - pos - hdr)
            break;
        uint8_t *p = buf + pos + hdr;
        if (mask_at)
            for (size_t i = 0; i < ln; i++)
                p[i] ^= buf[mask_at + (i & 3)];
        pos += hdr + (size_t)ln;
        int op = b0 & 0x0F, fin = b0 & 0x80;
        if (fin && op == 1 && !c->in_frag) {
            if (on_text(c, p, (size_t)ln, now))
                return GONE;
        } else if (op == 9) { /* ping -> pong */
            send_frame(c, 0xA, p, (size_t)ln);
        } else if (op == 8) { /* close */
            int code = ln >= 2 ? (p[0] << 8) | p[1] : 1005;
            char r[32];
            snprintf(r, sizeof r, "close %d", code);
            fail(c, r);
            return GONE;
        } else if (op == 1 || (op == 0 && c->in_frag)) { /* fragmented text */
            if (op == 1)
                c->frag_len = 0;
            if (c->frag_len + ln > MAX_FRAME) {
                fail(c, "message too large");
                return GONE;
            }
            if (!c->frag || c->frag_len + ln > c->frag_cap) {
                size_t cap = c->frag_cap ? c->frag_cap : 4096;
                while (cap < c->frag_len + ln)
                    cap *= 2;
                c->frag = xrealloc(c->frag, cap);
                c->frag_cap = cap;
            }
            memcpy(c->frag + c->frag_len, p, (size_t)ln);
            c->frag_len += (size_t)ln;
            c->in_frag = 1;
            if (fin) {
                c->in_frag = 0;
                if (on_text(c, c->frag, c->frag_len, now))
                    return GONE;
                c->frag_len = 0;
            }
        }
        /* binary, pong and continuations of binary messages: ignored */
    }
    return pos;
}

/* Bytes of the HTTP upgrade answer and beyond; the bytes used, or GONE. */
static size_t handle_input(Conn *c, uint8_t *buf, size_t n, double now) {
    size_t off = 0;
    if (c->state == ST_HANDSHAKE) {
        uint8_t *end = memmem(buf, n, "\r\n\r\n", 4);
        if (!end) {
            if (n > MAX_HEADER) {
                fail(c, "http response header too large");
                return GONE;
            }
            return 0;
        }
        uint8_t *eol = memmem(buf, (size_t)(end - buf), "\r\n", 2);
        size_t sl = (size_t)((eol ? eol : end) - buf);
        /* loadgen.py: b" 101 " in status + b" " */
        char status[256];
        size_t cl = sl < sizeof status - 2 ? sl : sizeof status - 2;
        memcpy(status, buf, cl);
        status[cl] = ' ';
        status[cl + 1] = 0;
        if (!strstr(status, " 101 ")) {
            status[cl] = 0;
            const char *tail = cl > 9 ? status + 9 : "";
            while (*tail == ' ' || *tail == '\t')
                tail++;
            size_t tl = strlen(tail);
            while (tl && (tail[tl - 1] == ' ' || tail[tl - 1] == '\t'))
                tl--;
            char r[REASON_LEN];
            snprintf(r, sizeof r, "http %.*s", (int)(tl > 100 ? 100 : tl), tail);
            fail(c, r);
            return GONE;
        }
        c->state = ST_OPEN;
        off = (size_t)(end - buf) + 4;
        on_open(c);
    }
    size_t used = ws_frames(c, buf + off, n - off, now);
    return used == GONE ? GONE : off + used;
}

static void carry_reserve(Conn *c, size_t need) {
    if (need <= c->carry_cap)
        return;
    size_t cap = c->carry_cap ? c->carry_cap : 4096;
    while (cap < need)
        cap *= 2;
    c->carry = xrealloc(c->carry, cap);
    c->carry_cap = cap;
}

static void on_readable(Conn *c) {
    for (int round = 0; round < 8; round++) {
        uint8_t *buf;
        size_t off, cap;
        int in_carry = 0;
        if (c->carry_len == 0) {
            buf = gbuf, off = 0, cap = GBUF_SIZE;
        } else if (c->carry_len <= GBUF_SIZE / 4) { /* small leftover: in front of the read */
            memcpy(gbuf, c->carry, c->carry_len);
            buf = gbuf, off = c->carry_len, cap = GBUF_SIZE;
            c->carry_len = 0;
        } else { /* a big frame in the making: read straight after it */
            carry_reserve(c, c->carry_len + GBUF_SIZE / 4);
            buf = c->carry, off = c->carry_len, cap = c->carry_cap, in_carry = 1;
        }
        ssize_t r = read(c->fd, buf + off, cap - off);
        if (r <= 0) {
            int err = r < 0 ? errno : 0;
            if (!in_carry)
                c->carry_len = off; /* still in c->carry: memcpy left it there */
            if (r < 0 && (err == EAGAIN || err == EWOULDBLOCK || err == EINTR))
                return;
            conn_lost(c, err);
            return;
        }
        size_t total = off + (size_t)r;
        size_t used = handle_input(c, buf, total, wall_ms());
        if (used == GONE)
            return;
        size_t left = total - used;
        if (in_carry) {
            if (used)
                memmove(c->carry, c->carry + used, left);
            c->carry_len = left;
        } else if (left) {
            carry_reserve(c, left);
            memcpy(c->carry, buf + used, left);
            c->carry_len = left;
        }
        if ((size_t)r < cap - off)
            return; /* drained */
    }
}

/* ------------------------------------------------------------------ connect */

static void on_connected(Conn *c) {
    c->state = ST_HANDSHAKE;
    conns_add(c);
    c->deadline = mono() + opt.ready_timeout;
    set_events(c, EPOLLIN);
    send_upgrade(c);
}

static void start_one(int idx) {
    job.in_flight++;
    if (opt.kind == KIND_PRICEFEED && idx >= ntokens) {
        reason_add(&job.reasons, "no token for this client (--tokens file too short)", 80);
        job.in_flight--;
        return;
    }
    Conn *c = calloc(1, sizeof *c);
    if (!c)
        die("out of memory");
    c->idx = idx;
    c->pos = c->pend_pos = c->resub_pos = -1;
    c->in_job = 1;
    for (int i = 0; i < MAXSYM; i++)
        c->last[i] = SEQ_NONE;
    c->deadline = mono() + opt.ready_timeout;
    pending_add(c);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail_connect(c, errno);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        fail_connect(c, errno);
        return;
    }
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
        on_connected(c);
    } else if (errno != EINPROGRESS) {
        fail_connect(c, errno);
    }
}

static void job_begin(int n) {
    memset(&job.reasons, 0, sizeof job.reasons);
    job.active = 1;
    job.start = job.next = next_idx;
    job.end = next_idx + n;
    next_idx += n;
    job.in_flight = job.ok = 0;
    job.t0 = mono();
    job.sleep_until = 0;
    if (job.start == 0 && opt.kind == KIND_BROADCASTER) {
        /* broadcaster 0.3.1's Broadcast.subscribe() loses a subscriber that joins a channel
         * while the channel's first SUBSCRIBE is in flight: one client per symbol alone
         * first, then a pause, then the rest (as loadgen.py does) */
        job.phase = 0;
        job.prime_end = job.start + (n < n_arg_syms ? n : n_arg_syms);
    } else {
        job.phase = 2;
    }
}

/* Start what may start; answer once everything is ready or failed. */
static void job_progress(void) {
    if (!job.active)
        return;
    double now = mono();
    if (job.phase == 0) {
        while (job.in_flight == 0 && job.next < job.prime_end)
            start_one(job.next++); /* a loop: one that fails at once is done at once */
        if (job.next >= job.prime_end && job.in_flight == 0) {
            job.phase = 1;
            job.sleep_until = now + 0.5;
        }
    }
    if (job.phase == 1 && now >= job.sleep_until)
        job.phase = 2;
    if (job.phase == 2)
        while (job.in_flight < opt.concurrency && job.next < job.end)
            start_one(job.next++);
    if (job.phase == 2 && job.next >= job.end && job.in_flight == 0) {
        int n = job.end - job.start;
        Buf b = {0};
        buf_printf(&b, "{\"event\":\"connected\",\"ok\":%d,\"failed\":%d,\"fail_reasons\":", job.ok,
                   n - job.ok);
        reason_json(&b, &job.reasons);
        buf_printf(&b, ",\"open\":%d,\"elapsed\":%.6f}", nconns, mono() - job.t0);
        job.active = 0;
        reply(&b);
    }
}

/* ------------------------------------------------------------------ control */

static void do_mark(int sub) {
    uint64_t silent = 0;
    if (!sub)
        for (int i = 0; i < nconns; i++) {
            Conn *c = conns[i];
            if (!c->got && c->state == ST_OPEN)
                silent++;
            c->got = 0;
        }
    double now = mono(), cpu = cpu_seconds();
    Buf b = {0};
    buf_printf(&b,
               "{\"event\":\"mark\",\"elapsed\":%.6f,\"cpu\":%.6f,\"frames\":%llu,\"ticks\":%llu,"
               "\"snapshots\":%llu,\"gaps\":%llu,\"missed\":%llu,\"dups\":%llu,\"errors\":%llu,"
               "\"error_sample\":",
               now - mark_at, cpu - mark_cpu, (unsigned long long)st.frames,
               (unsigned long long)st.ticks, (unsigned long long)st.snapshots,
               (unsigned long long)st.gaps, (unsigned long long)st.missed,
               (unsigned long long)st.dups, (unsigned long long)st.errors);
    buf_json_str(&b, st.error_sample, strlen(st.error_sample));
    buf_printf(&b, ",\"resubscribes\":%llu,\"lat_max\":%.4f,\"hist\":{",
               (unsigned long long)st.resubscribes, st.lat_max);
    int first = 1;
    for (int i = 0; i < LAT_BUCKETS; i++)
        if (st.hist[i]) {
            buf_printf(&b, first ? "\"%d\":%llu" : ",\"%d\":%llu", i,
                       (unsigned long long)st.hist[i]);
            first = 0;
        }
    buf_printf(&b, "},\"closed\":");
    reason_json(&b, &closed_map);
    buf_printf(&b, ",\"open\":%d,\"silent\":%llu}", nconns, (unsigned long long)silent);
    memset(&st, 0, sizeof st);
    memset(&closed_map, 0, sizeof closed_map);
    mark_at = now;
    mark_cpu = cpu;
    reply(&b);
}

static void quit_all(void) {
    while (nconns)
        destroy(conns[nconns - 1]);
    while (job.npending)
        destroy(job.pending[job.npending - 1]);
    Buf b = {0};
    buf_printf(&b, "{\"event\":\"bye\"}");
    reply(&b);
    exit(0);
}

/* One command line; the loop does not read the next one while a connect is running. */
static void command(char *line) {
    char *s = line;
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
        s[--n] = 0;
    if (n == 0 || strcmp(s, "quit") == 0)
        quit_all();
    char *words[4] = {0};
    int nw = 0;
    for (char *tok = strtok(s, " \t"); tok && nw < 4; tok = strtok(NULL, " \t"))
        words[nw++] = tok;
    if (strcmp(words[0], "connect") == 0 && nw == 2) {
        char *end;
        long v = strtol(words[1], &end, 10);
        if (*end == 0 && v >= 0 && v <= INT_MAX / 2) {
            job_begin((int)v);
            job_progress();
            return;
        }
    } else if (strcmp(words[0], "mark") == 0) {
        do_mark(nw == 2 && strcmp(words[1], "sub") == 0);
        return;
    }
    Buf b = {0};
    char msg[200];
    snprintf(msg, sizeof msg, "%s command '%.100s'",
             strcmp(words[0], "connect") == 0 ? "bad" : "unknown", words[0]);
    buf_printf(&b, "{\"event\":\"error\",\"message\":");
    buf_json_str(&b, msg, strlen(msg));
    buf_printf(&b, "}");
    reply(&b);
}

static Buf inbuf;
static int stdin_eof;
static int stdin_tag; /* its address marks stdin's epoll events */

static void read_stdin(void) {
    for (;;) {
        buf_reserve(&inbuf, 4096);
        ssize_t r = read(STDIN_FILENO, inbuf.p + inbuf.len, inbuf.cap - inbuf.len);
        if (r > 0) {
            inbuf.len += (size_t)r;
            continue;
        }
        if (r == 0) {
            stdin_eof = 1;
            epoll_ctl(ep, EPOLL_CTL_DEL, STDIN_FILENO, NULL);
        }
        return; /* EAGAIN */
    }
}

static void run_commands(void) {
    while (!job.active) {
        char *nl = inbuf.len ? memchr(inbuf.p, '\n', inbuf.len) : NULL;
        if (!nl) {
            if (stdin_eof) { /* EOF: like an empty line, quit */
                quit_all();
            }
            return;
        }
        size_t ln = (size_t)(nl - inbuf.p);
        char line[4096];
        size_t cl = ln < sizeof line - 1 ? ln : sizeof line - 1;
        memcpy(line, inbuf.p, cl);
        line[cl] = 0;
        memmove(inbuf.p, nl + 1, inbuf.len - ln - 1);
        inbuf.len -= ln + 1;
        command(line);
    }
}

/* ------------------------------------------------------------------ timers, main loop */

static void run_timers(void) {
    double now = mono();
    for (int i = job.npending - 1; i >= 0; i--) {
        if (i >= job.npending)
            continue;
        Conn *c = job.pending[i];
        if (c->deadline <= now)
            fail(c, "TimeoutError");
    }
    for (int i = nresubs - 1; i >= 0; i--) {
        if (i >= nresubs)
            continue;
        Conn *c = resubs[i];
        if (c->resub_at <= now) {
            resub_remove(c);
            if (c->state == ST_OPEN)
                pricefeed_subscribe(c);
        }
    }
}

static int next_timeout_ms(void) {
    double next = -1;
    for (int i = 0; i < job.npending; i++)
        if (next < 0 || job.pending[i]->deadline < next)
            next = job.pending[i]->deadline;
    for (int i = 0; i < nresubs; i++)
        if (next < 0 || resubs[i]->resub_at < next)
            next = resubs[i]->resub_at;
    if (job.active && job.phase == 1 && (next < 0 || job.sleep_until < next))
        next = job.sleep_until;
    if (next < 0)
        return -1;
    double ms = (next - mono()) * 1000.0;
    return ms <= 0 ? 0 : (int)ms + 1;
}

static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t want = rl.rlim_max == RLIM_INFINITY ? (rlim_t)1 << 20 : rl.rlim_max;
    if (rl.rlim_cur < want) {
        rl.rlim_cur = want;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void load_tokens(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        die("cannot read --tokens %s: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int tcap = 0;
    while ((n = getline(&line, &cap, f)) >= 0) {
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' '))
            line[--n] = 0;
        if (ntokens == tcap) {
            tcap = tcap ? tcap * 2 : 1024;
            tokens = xrealloc(tokens, sizeof(*tokens) * (size_t)tcap);
        }
        tokens[ntokens++] = strdup(line);
    }
    free(line);
    fclose(f);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --kind {broadcaster,pricefeed,sio} --port PORT --symbols A,B,...\n"
            "               [--per-client K] [--batch] [--concurrency N] [--ready-timeout S]\n"
            "               [--tokens FILE] [--coalesce-us US] [--jwt-secret S] [--audience A]\n"
            "--tokens: one JWT a line, line i for client i (required for pricefeed);\n"
            "--coalesce-us: after a wake-up with few sockets ready, let this long pass\n"
            "before waiting again (default 100; 0: off);\n"
            "--jwt-secret and --audience are accepted for loadgen.py compatibility, ignored.\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *symbols = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        char *val = NULL;
        const char *eq = strchr(a, '=');
        char name[64];
        if (strncmp(a, "--", 2) == 0 && eq && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = 0;
            val = (char *)eq + 1;
            a = name;
        }
#define ARG() (val ? val : (i + 1 < argc ? argv[++i] : (usage(), (char *)NULL)))
        if (strcmp(a, "--kind") == 0) {
            const char *k = ARG();
            opt.kind = strcmp(k, "pricefeed") == 0     ? KIND_PRICEFEED
                       : strcmp(k, "broadcaster") == 0 ? KIND_BROADCASTER
                       : strcmp(k, "sio") == 0         ? KIND_SIO
                                                       : -1;
            if (opt.kind < 0)
                die("--kind: choose from broadcaster, pricefeed, sio");
        } else if (strcmp(a, "--port") == 0) {
            opt.port = atoi(ARG());
        } else if (strcmp(a, "--symbols") == 0) {
            symbols = ARG();
        } else if (strcmp(a, "--per-client") == 0) {
            opt.per_client = atoi(ARG());
        } else if (strcmp(a, "--batch") == 0 && !val) {
            opt.batch = 1;
        } else if (strcmp(a, "--concurrency") == 0) {
            opt.concurrency = atoi(ARG());
        } else if (strcmp(a, "--ready-timeout") == 0) {
            opt.ready_timeout = atof(ARG());
        } else if (strcmp(a, "--tokens") == 0) {
            opt.tokens_path = ARG();
        } else if (strcmp(a, "--coalesce-us") == 0) {
            opt.coalesce = atof(ARG()) * 1e-6;
        } else if (strcmp(a, "--jwt-secret") == 0 || strcmp(a, "--audience") == 0) {
            (void)ARG();
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
        } else {
            fprintf(stderr, "loadgen: unknown argument %s\n", argv[i]);
            usage();
        }
#undef ARG
    }
    if (opt.kind < 0 || opt.port <= 0 || !symbols)
        usage();
    if (opt.concurrency < 1)
        opt.concurrency = 1;
    if (opt.per_client < 1)
        die("--per-client must be at least 1");
    char *sdup = strdup(symbols);
    for (char *tok = strtok(sdup, ","); tok; tok = strtok(NULL, ",")) {
        if (nsyms == MAXSYM)
            die("at most %d symbols", MAXSYM);
        syms[nsyms] = tok;
        symlen[nsyms] = strlen(tok);
        nsyms++;
    }
    n_arg_syms = nsyms;
    if (n_arg_syms == 0)
        die("--symbols is empty");
    if (opt.kind == KIND_PRICEFEED) {
        if (!opt.tokens_path)
            die("--kind pricefeed needs --tokens FILE (one JWT a line, line i for client i)");
        load_tokens(opt.tokens_path);
    }

    raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    rng_state = ((uint64_t)getpid() << 32) ^ (uint64_t)ts.tv_nsec ^ (uint64_t)ts.tv_sec;
    if (!rng_state)
        rng_state = 0x9E3779B97F4A7C15ULL;
    mark_at = mono();
    mark_cpu = cpu_seconds();

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1: %s", strerror(errno));
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &stdin_tag};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &sev) < 0) { /* a regular file: read it all */
        fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) & ~O_NONBLOCK);
        for (;;) {
            buf_reserve(&inbuf, 4096);
            ssize_t r = read(STDIN_FILENO, inbuf.p + inbuf.len, inbuf.cap - inbuf.len);
            if (r <= 0)
                break;
            inbuf.len += (size_t)r;
        }
        stdin_eof = 1;
    }

    enum { MAXEV = 1024, FEW = 64 };
    static struct epoll_event evs[MAXEV];
    int last_n = MAXEV;
    double woke = 0;
    for (;;) {
        run_commands();
        if (opt.coalesce > 0 && last_n < FEW) { /* see the comment at the top */
            double left = woke + opt.coalesce - mono();
            if (left > 0) {
                struct timespec d = {0, (long)(left * 1e9)};
                nanosleep(&d, NULL);
            }
        }
        int n = epoll_wait(ep, evs, MAXEV, next_timeout_ms());
        last_n = n;
        woke = mono();
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &stdin_tag) {
                read_stdin();
                continue;
            }
            Conn *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (c->state == ST_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                    err = errno;
                if (err)
                    fail_connect(c, err);
                else if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    on_connected(c);
                continue;
            }
            if ((e & EPOLLOUT) && c->out_len) {
                conn_flush(c);
            }
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
        run_timers();
        job_progress();
    }
}
