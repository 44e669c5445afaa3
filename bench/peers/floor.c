/*
 * bench/peers/floor.c: the benchmark's "kernel floor" peer (server `c-floor`).
 *
 * The least work a fan-out server can do with one write per message per client: one thread,
 * one epoll loop, one Redis connection. For each Redis pub/sub message it builds the
 * WebSocket text frame once, then does one send() of it to each subscriber of the channel:
 * no batching, no queue, no allocation per message. What it costs per delivered message is
 * then nearly all the kernel's (the send() and the TCP stack under it; on loopback also the
 * receiving side's softirq work, charged to this process), measured under the same harness as
 * the real servers. bench/README.md explains how to read them against it.
 *
 * It speaks what bench/peers/broadcaster_readme.py speaks (the load generator's "broadcaster"
 * client kind):
 *
 *   GET /                  200 "ok" (the health check), then the connection is closed
 *   GET /ws/SYM[,SYM...]   WebSocket upgrade (RFC 6455), no extensions; the client gets every
 *                          message published on prices:{SYM} (symbols uppercased), as is, in
 *                          a text frame. The first client to ask for a symbol makes this
 *                          process SUBSCRIBE to its channel, which then stays subscribed.
 *   anything else          400 or 404, then the connection is closed
 *
 * Client frames: a close is answered with a close frame echoing its code (then the connection
 * is closed), a ping with a pong; text and binary messages are read and ignored.
 *
 * A frame the client's socket does not take at once (EAGAIN or a partial send) is queued in
 * that connection's own buffer, written on EPOLLOUT, and later frames go behind it, in order.
 * Past OUT_LIMIT queued bytes the client is a slow reader: close frame 1013, then it goes.
 *
 * Env: PORT (default 8000), HOST (default 127.0.0.1), BROADCAST_URL
 * (redis://host[:port][/db], default redis://127.0.0.1:6379/0; no password, TLS or unix
 * socket: those exit 2). Pub/sub channels are not per database, so db is checked, not used.
 * Redis going away ends the process (exit 1): there is no reconnect. SIGTERM/SIGINT: exit 0.
 *
 * Build: gcc -O2 -std=c11 -Wall -Wextra -o floor bench/peers/floor.c
 *        (bench/servers.py builds it into bench/.build/floor)
 * `floor --self-test` checks the handshake's SHA-1 and base64 against known answers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE (64 * 1024)          /* one read from a client */
#define MAX_HEAD (16 * 1024)           /* HTTP request head */
#define MAX_CLIENT_FRAME (1u << 20)    /* a larger client frame: close 1009 */
#define OUT_LIMIT (4u << 20)           /* queued bytes per client before close 1013 */
#define MAX_SYMBOL 64                  /* bytes per symbol in /ws/... */
#define MAX_SYMBOLS 1024               /* symbols per client */
#define MAX_BULK (512ll << 20)         /* Redis' own limit on a bulk string */
#define CLOSE_GRACE 5.0                /* seconds a closing connection gets to flush and go */
#define BACKLOG 16384                  /* the kernel caps it at net.core.somaxconn */
#define CHANNEL_PREFIX "prices:"
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define NO_POS ((size_t)-1)

/* ------------------------------------------------------------------ small helpers */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

_Noreturn static void fatal(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("floor: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q)
        fatal(1, "out of memory (%zu bytes)", n);
    return q;
}

/* A byte buffer; p[off..len) is what is still pending (consumed from the front). */
typedef struct {
    uint8_t *p;
    size_t off, len, cap;
} Buf;

static size_t buf_pending(const Buf *b) { return b->len - b->off; }

static void buf_reserve(Buf *b, size_t extra) {
    if (b->off && b->len + extra > b->cap) { /* slide the pending bytes to the front first */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
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

static void buf_consume(Buf *b, size_t n) {
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = 0;
}

static void buf_free(Buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

static int ascii_upper(int ch) { return ch >= 'a' && ch <= 'z' ? ch - 32 : ch; }

/* ------------------------------------------------------------------ SHA-1 and base64 */

/* Only the handshake's Sec-WebSocket-Accept uses these: SHA-1 (FIPS 180-4) of a short
 * string, one shot, and base64 with padding. */

static uint32_t rol32(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol32(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const uint8_t *d, size_t n, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t i = 0;
    for (; n - i >= 64; i += 64)
        sha1_block(h, d + i);
    /* the tail, 0x80, zeros, the length in bits (big-endian): one block or two */
    uint8_t tail[128] = {0};
    size_t r = n - i;
    memcpy(tail, d + i, r);
    tail[r] = 0x80;
    size_t tlen = r + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)n * 8;
    for (int k = 0; k < 8; k++)
        tail[tlen - 1 - (size_t)k] = (uint8_t)(bits >> (8 * k));
    sha1_block(h, tail);
    if (tlen == 128)
        sha1_block(h, tail + 64);
    for (int k = 0; k < 5; k++) {
        out[4 * k] = (uint8_t)(h[k] >> 24);
        out[4 * k + 1] = (uint8_t)(h[k] >> 16);
        out[4 * k + 2] = (uint8_t)(h[k] >> 8);
        out[4 * k + 3] = (uint8_t)h[k];
    }
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* base64 of d[0..n) into out (room for 4 * ceil(n / 3) + 1), NUL-terminated; its length. */
static size_t base64(const uint8_t *d, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)d[i + 1] << 8;
        if (i + 2 < n)
            v |= d[i + 2];
        out[o++] = B64[(v >> 18) & 63];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? B64[v & 63] : '=';
    }
    out[o] = 0;
    return o;
}

/* Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64(SHA-1(key + GUID)), 28 chars + NUL. */
static void ws_accept(const char *key, size_t n, char out[29]) {
    uint8_t in[128], digest[20];
    size_t glen = sizeof WS_GUID - 1;
    if (n > sizeof in - glen)
        n = sizeof in - glen; /* not reached: keys are checked to be 24 chars first */
    memcpy(in, key, n);
    memcpy(in + n, WS_GUID, glen);
    sha1(in, n + glen, digest);
    base64(digest, 20, out);
}

static int self_test(void) {
    static const struct {
        const char *in, *hex;
    } sha[] = {
        {"", "da39a3ee5e6b4b0d3255bfef95601890afd80709"},
        {"abc", "a9993e364706816aba3e25717850c26c9cd0d89d"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", /* two-block tail */
         "84983e441c3bd26ebaae4aa1f95129e5e54670f1"},
    };
    static const struct { /* "a" * n around the block and padding edges (Python's hashlib) */
        size_t n;
        const char *hex;
    } as[] = {
        {55, "c1c8bbdc22796e28c0e15163d20899b65621d65a"},
        {56, "c2db330f6083854c99d4b5bfb6e8f29f201be699"},
        {63, "03f09f5b158a7a8cdad920bddc29b81c18a551f5"},
        {64, "0098ba824b5c16427bd7a1122a5a442a25ec644d"},
        {65, "11655326c708d70319be2610e8a57d9a5b959d3b"},
        {119, "ee971065aaa017e0632a8ca6c77bb3bf8b1dfc56"},
        {120, "f34c1488385346a55709ba056ddd08280dd4c6d6"},
    };
    size_t nsha = sizeof sha / sizeof sha[0], nas = sizeof as / sizeof as[0];
    uint8_t a[128];
    memset(a, 'a', sizeof a);
    int bad = 0;
    for (size_t t = 0; t < nsha + nas; t++) {
        const uint8_t *in = t < nsha ? (const uint8_t *)sha[t].in : a;
        size_t n = t < nsha ? strlen(sha[t].in) : as[t - nsha].n;
        const char *want = t < nsha ? sha[t].hex : as[t - nsha].hex;
        uint8_t d[20];
        char hex[41];
        sha1(in, n, d);
        for (int k = 0; k < 20; k++)
            snprintf(hex + 2 * k, 3, "%02x", d[k]);
        if (strcmp(hex, want) != 0) {
            printf("FAIL sha1 of %zu bytes (\"%.8s...\") = %s, want %s\n", n, in, hex, want);
            bad = 1;
        }
    }
    char b[16];
    base64((const uint8_t *)"fo", 2, b);
    if (strcmp(b, "Zm8=") != 0) {
        printf("FAIL base64(\"fo\") = %s\n", b);
        bad = 1;
    }
    base64((const uint8_t *)"foob", 4, b);
    if (strcmp(b, "Zm9vYg==") != 0) {
        printf("FAIL base64(\"foob\") = %s\n", b);
        bad = 1;
    }
    /* RFC 6455, section 1.3 */
    char acc[29];
    const char *key = "dGhlIHNhbXBsZSBub25jZQ==";
    ws_accept(key, strlen(key), acc);
    if (strcmp(acc, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") != 0) {
        printf("FAIL accept(%s) = %s\n", key, acc);
        bad = 1;
    }
    printf(bad ? "self-test failed\n" : "self-test ok (sha1, base64, RFC 6455 accept key)\n");
    return bad;
}

/* ------------------------------------------------------------------ connections and channels */

enum {
    ST_HTTP,    /* reading the request head */
    ST_WS,      /* an open WebSocket */
    ST_CLOSING, /* a last answer is queued (HTTP response or close frame): flush, then DRAIN */
    ST_DRAIN,   /* our side shut down: read and drop until the client closes */
    ST_DEAD     /* socket closed, memory freed after this epoll batch */
};

typedef struct Channel Channel;
typedef struct Conn Conn;

typedef struct { /* a subscription of a connection: the channel, its slot in ch->members */
    Channel *ch;
    size_t pos;
} Sub;

typedef struct { /* a member of a channel: the connection, which of its subs this is */
    Conn *c;
    size_t sub;
} Member;

struct Conn {
    int fd;
    uint8_t state;
    uint8_t in_frag; /* inside a fragmented data message (whose content is ignored) */
    uint32_t events; /* what epoll watches for it */
    Buf in;          /* an incomplete request head or frame, carried to the next read */
    Buf out;         /* what the socket did not take yet */
    Sub *subs;
    size_t nsubs;
    double deadline;   /* ST_CLOSING, ST_DRAIN: closed at this time regardless */
    size_t closing_at; /* index in `closing`, or NO_POS */
    Conn *next_dead;
};

struct Channel {
    char *name; /* "prices:SYM" */
    size_t name_len;
    uint64_t hash;
    Member *members;
    size_t nmembers, cap;
};

static int ep, listen_fd = -1, redis_fd = -1;
static char listen_tag, redis_tag; /* epoll data.ptr of the two non-client sockets */
static uint8_t rbuf[READ_SIZE];    /* clients' reads land here first */
static Buf frame;                  /* the frame being fanned out */
static Buf redis_in, redis_out;
static uint32_t redis_events;
static Conn **closing; /* connections in ST_CLOSING / ST_DRAIN, for their deadline */
static size_t nclosing, closing_cap;
static Conn *dead; /* killed during this epoll batch, freed at its end */
static Channel **table; /* open addressing, power-of-two size, channels are never removed */
static size_t table_cap, nchannels;
static int accept_paused; /* out of fds: the listener is off until accept_resume */
static double accept_resume;

static void redis_command(const char *verb, const char *arg, size_t arg_len);

static uint64_t fnv1a(const void *d, size_t n) {
    const uint8_t *p = d;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static Channel *channel_find(const char *name, size_t n, uint64_t h) {
    if (!table_cap)
        return NULL;
    for (size_t i = h & (table_cap - 1);; i = (i + 1) & (table_cap - 1)) {
        Channel *ch = table[i];
        if (!ch)
            return NULL;
        if (ch->hash == h && ch->name_len == n && memcmp(ch->name, name, n) == 0)
            return ch;
    }
}

static void table_insert(Channel *ch) {
    size_t i = ch->hash & (table_cap - 1);
    while (table[i])
        i = (i + 1) & (table_cap - 1);
    table[i] = ch;
}

/* The channel, created (and subscribed to in Redis) the first time it is asked for. */
static Channel *channel_get(const char *name, size_t n) {
    uint64_t h = fnv1a(name, n);
    Channel *ch = channel_find(name, n, h);
    if (ch)
        return ch;
    if ((nchannels + 1) * 2 > table_cap) { /* keep the load under 1/2 */
        Channel **old = table;
        size_t old_cap = table_cap;
        table_cap = table_cap ? table_cap * 2 : 64;
        table = calloc(table_cap, sizeof *table);
        if (!table)
            fatal(1, "out of memory");
        for (size_t i = 0; i < old_cap; i++)
            if (old[i])
                table_insert(old[i]);
        free(old);
    }
    ch = calloc(1, sizeof *ch);
    if (!ch)
        fatal(1, "out of memory");
    ch->name = xrealloc(NULL, n);
    memcpy(ch->name, name, n);
    ch->name_len = n;
    ch->hash = h;
    table_insert(ch);
    nchannels++;
    redis_command("SUBSCRIBE", name, n);
    return ch;
}

static void subscribe(Conn *c, Channel *ch) {
    for (size_t i = 0; i < c->nsubs; i++)
        if (c->subs[i].ch == ch)
            return; /* /ws/A,A: one subscription, each message once */
    if (ch->nmembers == ch->cap) {
        ch->cap = ch->cap ? ch->cap * 2 : 64;
        ch->members = xrealloc(ch->members, ch->cap * sizeof *ch->members);
    }
    c->subs = xrealloc(c->subs, (c->nsubs + 1) * sizeof *c->subs);
    ch->members[ch->nmembers] = (Member){c, c->nsubs};
    c->subs[c->nsubs++] = (Sub){ch, ch->nmembers++};
}

/* Leave every channel. Each removal moves a channel's last member into the freed slot, so a
 * fan-out loop that walks the members from the end may drop the member it is at. */
static void unsubscribe_all(Conn *c) {
    for (size_t i = 0; i < c->nsubs; i++) {
        Channel *ch = c->subs[i].ch;
        size_t pos = c->subs[i].pos, last = --ch->nmembers;
        if (pos != last) {
            Member m = ch->members[last];
            ch->members[pos] = m;
            m.c->subs[m.sub].pos = pos;
        }
    }
    free(c->subs);
    c->subs = NULL;
    c->nsubs = 0;
}

static void closing_remove(Conn *c) {
    if (c->closing_at == NO_POS)
        return;
    Conn *last = closing[--nclosing];
    closing[c->closing_at] = last;
    last->closing_at = c->closing_at;
    c->closing_at = NO_POS;
}

/* Close the socket now; the memory goes at the end of the epoll batch, since later events of
 * the batch may still point at it. */
static void conn_kill(Conn *c) {
    if (c->state == ST_DEAD)
        return;
    unsubscribe_all(c);
    closing_remove(c);
    close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->state = ST_DEAD;
    c->next_dead = dead;
    dead = c;
}

static void reap(void) {
    while (dead) {
        Conn *c = dead;
        dead = c->next_dead;
        buf_free(&c->in);
        buf_free(&c->out);
        free(c);
    }
}

static void set_events(Conn *c, uint32_t events) {
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        conn_kill(c);
        return;
    }
    c->events = events;
}

/* ------------------------------------------------------------------ writing to clients */

/* d[0..n) to the client: with nothing queued, one send() and what it did not take is queued;
 * else behind the queue. A socket that is gone is killed. */
static void conn_write(Conn *c, const uint8_t *d, size_t n) {
    if (buf_pending(&c->out) == 0) {
        ssize_t w;
        do
            w = send(c->fd, d, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (w < 0 && errno == EINTR);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            conn_kill(c); /* EPIPE, ECONNRESET: the client is gone */
            return;
        }
        if (w > 0) {
            d += w;
            n -= (size_t)w;
        }
        if (n == 0)
            return;
        set_events(c, EPOLLIN | EPOLLOUT);
        if (c->state == ST_DEAD)
            return;
    }
    buf_add(&c->out, d, n);
}

static size_t ws_header(uint8_t *h, int opcode, size_t n) {
    h[0] = (uint8_t)(0x80 | opcode); /* FIN */
    if (n < 126) {
        h[1] = (uint8_t)n;
        return 2;
    }
    if (n < 65536) {
        h[1] = 126;
        h[2] = (uint8_t)(n >> 8);
        h[3] = (uint8_t)n;
        return 4;
    }
    h[1] = 127;
    for (int k = 0; k < 8; k++)
        h[2 + k] = (uint8_t)((uint64_t)n >> (56 - 8 * k));
    return 10;
}

/* A control frame (payload at most 125 bytes), server to client: unmasked. */
static void send_control(Conn *c, int opcode, const uint8_t *p, size_t n) {
    uint8_t f[2 + 125];
    size_t h = ws_header(f, opcode, n);
    memcpy(f + h, p, n);
    conn_write(c, f, h + n);
}

static void finish_closing(Conn *c) {
    shutdown(c->fd, SHUT_WR); /* FIN after the last answer; the client closes its side */
    c->state = ST_DRAIN;
    buf_free(&c->out);
    buf_free(&c->in);
}

/* The last answer is queued: leave the channels, flush, shut down, wait for the client's
 * EOF, at most CLOSE_GRACE seconds. */
static void start_closing(Conn *c) {
    if (c->state == ST_DEAD)
        return;
    unsubscribe_all(c);
    c->state = ST_CLOSING;
    c->deadline = mono() + CLOSE_GRACE;
    if (nclosing == closing_cap) {
        closing_cap = closing_cap ? closing_cap * 2 : 64;
        closing = xrealloc(closing, closing_cap * sizeof *closing);
    }
    c->closing_at = nclosing;
    closing[nclosing++] = c;
    if (buf_pending(&c->out) == 0)
        finish_closing(c);
}

/* Close the WebSocket with `code` (-1: a close frame without one). */
static void ws_close(Conn *c, int code) {
    if (c->state != ST_WS)
        return;
    unsubscribe_all(c);
    uint8_t p[2] = {0, 0};
    if (code >= 0) {
        p[0] = (uint8_t)(code >> 8);
        p[1] = (uint8_t)(code & 0xFF);
    }
    send_control(c, 0x8, p, code < 0 ? 0 : 2);
    start_closing(c);
}

/* A close code an endpoint may put in a close frame (RFC 6455, section 7.4). */
static int sendable_code(int code) {
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
           (code >= 3000 && code <= 4999);
}

static void http_reply(Conn *c, const char *status, const char *extra, const char *body) {
    char r[512];
    int n = snprintf(r, sizeof r,
                     "HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n%s\r\n%s",
                     status, strlen(body), extra, body);
    conn_write(c, (const uint8_t *)r, (size_t)n);
    start_closing(c);
}

/* EPOLLOUT: write what is queued. */
static void flush_out(Conn *c) {
    while (buf_pending(&c->out)) {
        ssize_t w = send(c->fd, c->out.p + c->out.off, buf_pending(&c->out),
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            conn_kill(c);
            return;
        }
        buf_consume(&c->out, (size_t)w);
    }
    buf_free(&c->out); /* a backlog's memory goes back once it is written */
    set_events(c, EPOLLIN);
    if (c->state == ST_CLOSING)
        finish_closing(c);
}

/* ------------------------------------------------------------------ fan-out */

/* One Redis message: its frame built once, one send() of it per subscriber (or queued behind
 * what that subscriber already has queued). */
static void fan_out(const uint8_t *chan, size_t chan_len, const uint8_t *msg, size_t n) {
    Channel *ch = channel_find((const char *)chan, chan_len, fnv1a(chan, chan_len));
    if (!ch || ch->nmembers == 0)
        return;
    frame.off = frame.len = 0;
    buf_reserve(&frame, n + 10);
    frame.len = ws_header(frame.p, 0x1, n); /* text: the message is passed on as is */
    memcpy(frame.p + frame.len, msg, n);
    frame.len += n;
    /* from the end: a member that is closed here is replaced by the last one, already done */
    for (size_t i = ch->nmembers; i-- > 0;) {
        Conn *c = ch->members[i].c;
        if (buf_pending(&c->out) + frame.len > OUT_LIMIT)
            ws_close(c, 1013); /* a slow reader: "try again later" */
        else
            conn_write(c, frame.p, frame.len);
    }
}

/* ------------------------------------------------------------------ HTTP: health and upgrade */

/* Does the comma-separated header value v[0..n) hold `token` (case-insensitive)? */
static int has_token(const char *v, size_t n, const char *token) {
    size_t tl = strlen(token), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tl && strncasecmp(v + s, token, tl) == 0)
            return 1;
    }
    return 0;
}

static int valid_key(const char *k, size_t n) { /* base64 of 16 bytes */
    if (n != 24 || k[22] != '=' || k[23] != '=')
        return 0;
    for (size_t i = 0; i < 22; i++)
        if (!strchr(B64, k[i]) || k[i] == 0)
            return 0;
    return 1;
}

static int symbol_char(int ch) {
    return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
           ch == '.' || ch == '_' || ch == '-' || ch == ':';
}

/* The symbols in s[0..n) ("A,b,,C"): checked, then each client subscribed to prices:{SYM}.
 * An empty item is skipped, as the Python peer does. 0 when the list is not acceptable. */
static int check_symbols(const char *s, size_t n) {
    size_t count = 0, len = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || s[i] == ',') {
            if (len) {
                if (len > MAX_SYMBOL || ++count > MAX_SYMBOLS)
                    return 0;
            }
            len = 0;
        } else if (!symbol_char((unsigned char)s[i])) {
            return 0;
        } else {
            len++;
        }
    }
    return count > 0;
}

static void subscribe_symbols(Conn *c, const char *s, size_t n) {
    char name[sizeof CHANNEL_PREFIX + MAX_SYMBOL];
    size_t plen = sizeof CHANNEL_PREFIX - 1, len = plen;
    memcpy(name, CHANNEL_PREFIX, plen);
    for (size_t i = 0; i <= n; i++) {
        if (i == n || s[i] == ',') {
            if (len > plen)
                subscribe(c, channel_get(name, len));
            len = plen;
        } else {
            name[len++] = (char)ascii_upper((unsigned char)s[i]);
        }
    }
}

/* The request head in p[0..n) (up to and including the blank line): answered. */
static void http_request(Conn *c, char *p, size_t n) {
    char *eol = memmem(p, n, "\r\n", 2); /* there is one: the head ends in \r\n\r\n */
    char *sp1 = memchr(p, ' ', (size_t)(eol - p));
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
    if (!sp2 || eol - sp2 - 1 != 8 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        http_reply(c, "400 Bad Request", "", "bad request line\n");
        return;
    }
    if (sp1 - p != 3 || memcmp(p, "GET", 3) != 0) {
        http_reply(c, "400 Bad Request", "", "only GET is served here\n");
        return;
    }
    const char *path = sp1 + 1;
    size_t path_len = (size_t)(sp2 - path);
    const char *q = memchr(path, '?', path_len);
    if (q)
        path_len = (size_t)(q - path); /* the query string is ignored */

    int upgrade = 0, conn_upgrade = 0, version13 = 0;
    const char *key = NULL;
    size_t key_len = 0;
    for (char *line = eol + 2; line < p + n - 2;) {
        char *end = memmem(line, (size_t)(p + n - line), "\r\n", 2);
        char *colon = memchr(line, ':', (size_t)(end - line));
        if (colon) {
            size_t name_len = (size_t)(colon - line);
            const char *v = colon + 1;
            while (v < end && (*v == ' ' || *v == '\t'))
                v++;
            size_t vl = (size_t)(end - v);
            while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
                vl--;
#define IS(h) (name_len == sizeof(h) - 1 && strncasecmp(line, h, name_len) == 0)
            if (IS("Upgrade"))
                upgrade |= has_token(v, vl, "websocket");
            else if (IS("Connection"))
                conn_upgrade |= has_token(v, vl, "upgrade");
            else if (IS("Sec-WebSocket-Version"))
                version13 = vl == 2 && memcmp(v, "13", 2) == 0;
            else if (IS("Sec-WebSocket-Key"))
                key = v, key_len = vl;
#undef IS
        }
        line = end + 2;
    }

    if (path_len == 1 && path[0] == '/') {
        http_reply(c, "200 OK", "", "ok");
        return;
    }
    if (path_len < 4 || memcmp(path, "/ws/", 4) != 0 || memchr(path + 4, '/', path_len - 4)) {
        http_reply(c, "404 Not Found", "", "not found\n");
        return;
    }
    if (!upgrade || !conn_upgrade) {
        http_reply(c, "400 Bad Request", "", "a WebSocket upgrade is expected here\n");
        return;
    }
    if (!version13) {
        http_reply(c, "400 Bad Request", "Sec-WebSocket-Version: 13\r\n",
                   "unsupported Sec-WebSocket-Version\n");
        return;
    }
    if (!key || !valid_key(key, key_len)) {
        http_reply(c, "400 Bad Request", "", "bad Sec-WebSocket-Key\n");
        return;
    }
    const char *syms = path + 4;
    size_t syms_len = path_len - 4;
    if (!check_symbols(syms, syms_len)) {
        http_reply(c, "400 Bad Request", "",
                   "expected /ws/SYM[,SYM...], symbols of [A-Za-z0-9._:-]\n");
        return;
    }
    char accept[29], r[256];
    ws_accept(key, key_len, accept);
    int rn = snprintf(r, sizeof r,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                      accept);
    conn_write(c, (const uint8_t *)r, (size_t)rn);
    if (c->state == ST_DEAD)
        return;
    c->state = ST_WS;
    subscribe_symbols(c, syms, syms_len);
}

/* ------------------------------------------------------------------ reading from clients */

/* Complete client frames in p[0..n): handled. Returns the bytes used; stops early when the
 * connection leaves ST_WS. */
static size_t ws_input(Conn *c, uint8_t *p, size_t n) {
    size_t pos = 0;
    while (c->state == ST_WS && n - pos >= 2) {
        uint8_t b0 = p[pos], b1 = p[pos + 1];
        int fin = b0 & 0x80, op = b0 & 0x0F;
        if ((b0 & 0x70) || !(b1 & 0x80)) { /* RSV bits without an extension, or unmasked */
            ws_close(c, 1002);
            break;
        }
        uint64_t len = b1 & 0x7F;
        size_t hdr = 2;
        if (len == 126) {
            if (n - pos < 4)
                break;
            len = (uint64_t)p[pos + 2] << 8 | p[pos + 3];
            hdr = 4;
        } else if (len == 127) {
            if (n - pos < 10)
                break;
            len = 0;
            for (int k = 2; k < 10; k++)
                len = len << 8 | p[pos + (size_t)k];
            hdr = 10;
        }
        if (len > MAX_CLIENT_FRAME) {
            ws_close(c, 1009); /* message too big */
            break;
        }
        hdr += 4; /* the mask */
        if (n - pos < hdr + len)
            break; /* the rest of it comes with a later read */
        uint8_t *mask = p + pos + hdr - 4, *pl = p + pos + hdr;
        pos += hdr + (size_t)len;
        if (op >= 8) { /* control frames: whole (FIN) and short; they may come mid-message */
            if (!fin || len > 125) {
                ws_close(c, 1002);
                break;
            }
            for (size_t i = 0; i < len; i++)
                pl[i] ^= mask[i & 3];
            if (op == 0x8) { /* close: echo its code (none: none) */
                int code = len >= 2 ? (pl[0] << 8) | pl[1] : -1;
                if (len == 1 || (len >= 2 && !sendable_code(code)))
                    code = 1002; /* a code no endpoint may send: a protocol error */
                ws_close(c, code);
            } else if (op == 0x9) {
                send_control(c, 0xA, pl, (size_t)len); /* pong, same payload */
            } else if (op != 0xA) {
                ws_close(c, 1002); /* reserved opcode */
            }
        } else if (op > 2 || (op == 0) != (c->in_frag != 0)) {
            /* a reserved opcode, a continuation with no message started, or a new message
             * before the previous one's last fragment */
            ws_close(c, 1002);
        } else {
            c->in_frag = !fin; /* text, binary and their continuations: not read */
        }
    }
    return pos;
}

/* Bytes from the client, d[0..n) (the shared read buffer): handled, an incomplete head or
 * frame kept in c->in for the next read. */
static void on_data(Conn *c, uint8_t *d, size_t n) {
    uint8_t *p = d;
    size_t len = n, used = 0;
    if (buf_pending(&c->in)) { /* after what was carried over */
        buf_add(&c->in, d, n);
        p = c->in.p + c->in.off;
        len = buf_pending(&c->in);
    }
    if (c->state == ST_HTTP) {
        uint8_t *end = memmem(p, len, "\r\n\r\n", 4);
        if (!end) {
            if (len > MAX_HEAD)
                http_reply(c, "431 Request Header Fields Too Large", "", "head too large\n");
        } else if ((size_t)(end - p) + 4 > MAX_HEAD) {
            http_reply(c, "431 Request Header Fields Too Large", "", "head too large\n");
        } else {
            used = (size_t)(end - p) + 4;
            http_request(c, (char *)p, used);
        }
    }
    if (c->state == ST_WS)
        used += ws_input(c, p + used, len - used);
    if (c->state != ST_HTTP && c->state != ST_WS) {
        if (c->state != ST_DEAD)
            buf_free(&c->in); /* closing: whatever else was sent is dropped */
        return;
    }
    if (p == d) { /* parsed in place: keep the rest */
        if (used < len)
            buf_add(&c->in, p + used, len - used);
    } else {
        buf_consume(&c->in, used);
        if (buf_pending(&c->in) == 0)
            buf_free(&c->in);
    }
}

static void on_readable(Conn *c) {
    for (int round = 0; round < 8; round++) {
        ssize_t r = read(c->fd, rbuf, sizeof rbuf);
        if (r == 0) {
            conn_kill(c); /* EOF: in ST_DRAIN, the normal end */
            return;
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                conn_kill(c);
            return;
        }
        if (c->state == ST_HTTP || c->state == ST_WS)
            on_data(c, rbuf, (size_t)r);
        /* ST_CLOSING / ST_DRAIN: dropped */
        if (c->state == ST_DEAD || (size_t)r < sizeof rbuf)
            return;
    }
}

/* ------------------------------------------------------------------ accepting */

static void listen_events(uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = &listen_tag};
    epoll_ctl(ep, EPOLL_CTL_MOD, listen_fd, &ev);
}

static void on_accept(void) {
    for (int k = 0; k < 512; k++) { /* then let the other sockets have a turn */
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* level-triggered: retrying now would spin; the timer resumes in a second */
                fprintf(stderr, "floor: accept: %s: accepting paused for 1 s\n",
                        strerror(errno));
                listen_events(0);
                accept_paused = 1;
                accept_resume = mono() + 1.0;
                return;
            }
            fatal(1, "accept: %s", strerror(errno));
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        Conn *c = calloc(1, sizeof *c);
        if (!c)
            fatal(1, "out of memory");
        c->fd = fd;
        c->state = ST_HTTP;
        c->closing_at = NO_POS;
        c->events = EPOLLIN;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
        }
    }
}

/* About once a second while needed: closing connections past their deadline go, and
 * accepting resumes after a pause. */
static void sweep(double now) {
    for (size_t i = nclosing; i-- > 0;)
        if (closing[i]->deadline <= now)
            conn_kill(closing[i]); /* swaps the last one into i: already looked at */
    if (accept_paused && now >= accept_resume) {
        accept_paused = 0;
        listen_events(EPOLLIN);
    }
}

/* ------------------------------------------------------------------ Redis */

static void redis_set_events(uint32_t events) {
    if (events == redis_events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = &redis_tag};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, redis_fd, &ev) < 0)
        fatal(1, "epoll_ctl (redis): %s", strerror(errno));
    redis_events = events;
}

static void redis_flush(void) {
    while (buf_pending(&redis_out)) {
        ssize_t w = send(redis_fd, redis_out.p + redis_out.off, buf_pending(&redis_out),
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                redis_set_events(EPOLLIN | EPOLLOUT);
                return;
            }
            fatal(1, "redis connection lost (send: %s)", strerror(errno));
        }
        buf_consume(&redis_out, (size_t)w);
    }
    redis_set_events(EPOLLIN);
}

/* VERB ARG, as a RESP array of two bulk strings. */
static void redis_command(const char *verb, const char *arg, size_t arg_len) {
    char head[64];
    int n = snprintf(head, sizeof head, "*2\r\n$%zu\r\n%s\r\n$%zu\r\n", strlen(verb), verb,
                     arg_len);
    buf_add(&redis_out, head, (size_t)n);
    buf_add(&redis_out, arg, arg_len);
    buf_add(&redis_out, "\r\n", 2);
    redis_flush();
}

/* RESP2 replies, as a subscribed connection gets them: arrays of bulk strings and integers
 * ("message", channel, payload / "subscribe", channel, count), or a top-level error. */
typedef struct {
    char type; /* '$' bulk string (s == NULL: null), ':' integer, '+' simple, '-' error */
    const uint8_t *s;
    size_t n;
    long long i;
} RItem;

/* The line at p: its length with the CRLF, 0 when it is not all there yet. */
static size_t resp_line(const uint8_t *p, size_t n) {
    const uint8_t *nl = memchr(p, '\n', n);
    if (!nl)
        return 0;
    if (nl - p < 2 || nl[-1] != '\r')
        fatal(1, "redis: malformed reply");
    return (size_t)(nl - p) + 1;
}

static long long resp_int(const uint8_t *p, size_t line_len) { /* the number after the type */
    const uint8_t *q = p + 1, *e = p + line_len - 2;
    int neg = q < e && *q == '-';
    q += neg;
    if (q == e)
        fatal(1, "redis: malformed number in a reply");
    long long v = 0;
    for (; q < e; q++) {
        if (*q < '0' || *q > '9' || v > (1ll << 50))
            fatal(1, "redis: malformed number in a reply");
        v = v * 10 + (*q - '0');
    }
    return neg ? -v : v;
}

/* One item that is not an array, at p: bytes used, 0 when incomplete. */
static size_t resp_item(const uint8_t *p, size_t n, RItem *it) {
    size_t l = resp_line(p, n);
    if (!l)
        return 0;
    it->type = (char)p[0];
    it->s = NULL;
    it->n = 0;
    switch (p[0]) {
    case '+':
    case '-':
        it->s = p + 1;
        it->n = l - 3;
        return l;
    case ':':
        it->i = resp_int(p, l);
        return l;
    case '$': {
        long long len = resp_int(p, l);
        if (len < 0)
            return l; /* null */
        if (len > MAX_BULK)
            fatal(1, "redis: bulk string of %lld bytes", len);
        if (n - l < (size_t)len + 2)
            return 0;
        if (p[l + (size_t)len] != '\r' || p[l + (size_t)len + 1] != '\n')
            fatal(1, "redis: malformed bulk string");
        it->s = p + l;
        it->n = (size_t)len;
        return l + (size_t)len + 2;
    }
    default:
        fatal(1, "redis: unexpected reply type '%c'", p[0]);
    }
    return 0;
}

/* One whole reply at p[0..n): bytes used (0: incomplete); its first `max` items (a non-array
 * reply is one item) in items, their number in *count. */
static size_t resp_reply(const uint8_t *p, size_t n, RItem *items, int max, int *count) {
    *count = 0;
    if (p[0] != '*') {
        size_t u = resp_item(p, n, &items[0]);
        *count = u ? 1 : 0;
        return u;
    }
    size_t l = resp_line(p, n);
    if (!l)
        return 0;
    long long k = resp_int(p, l); /* -1: a null array */
    size_t pos = l;
    for (long long j = 0; j < k; j++) {
        RItem spare;
        if (pos >= n)
            return 0;
        if (p[pos] == '*')
            fatal(1, "redis: nested array in a reply");
        size_t u = resp_item(p + pos, n - pos, j < max ? &items[j] : &spare);
        if (!u)
            return 0;
        pos += u;
    }
    *count = k < 0 ? 0 : k < max ? (int)k : max;
    return pos;
}

static int item_is(const RItem *it, const char *s) {
    size_t n = strlen(s);
    return it->type == '$' && it->s && it->n == n && memcmp(it->s, s, n) == 0;
}

/* Every whole reply in redis_in: the messages fanned out, the rest (subscribe confirmations)
 * ignored. What is left is the start of a reply still on its way. */
static void redis_replies(void) {
    while (buf_pending(&redis_in)) {
        RItem it[3];
        int k;
        size_t used =
            resp_reply(redis_in.p + redis_in.off, buf_pending(&redis_in), it, 3, &k);
        if (!used)
            return;
        if (k >= 1 && it[0].type == '-')
            fatal(1, "redis answered an error: %.*s", (int)it[0].n, (const char *)it[0].s);
        if (k == 3 && item_is(&it[0], "message") && it[1].type == '$' && it[1].s &&
            it[2].type == '$' && it[2].s)
            fan_out(it[1].s, it[1].n, it[2].s, it[2].n);
        buf_consume(&redis_in, used);
    }
}

static void on_redis_readable(void) {
    for (int round = 0; round < 16; round++) {
        buf_reserve(&redis_in, READ_SIZE);
        size_t room = redis_in.cap - redis_in.len;
        ssize_t r = read(redis_fd, redis_in.p + redis_in.len, room);
        if (r == 0)
            fatal(1, "redis connection lost (closed by the server)");
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            fatal(1, "redis connection lost (read: %s)", strerror(errno));
        }
        redis_in.len += (size_t)r;
        redis_replies();
        if ((size_t)r < room)
            return; /* drained */
    }
}

/* ------------------------------------------------------------------ configuration and setup */

_Noreturn static void bad_url(const char *url, const char *why) {
    fatal(2, "unsupported BROADCAST_URL %s: %s; expected redis://host[:port][/db]", url, why);
}

/* BROADCAST_URL: redis://host[:port][/db] (host may be [IPv6]); anything else exits 2. */
static void parse_redis_url(const char *url, char *host, size_t host_cap, char port[6]) {
    if (strncmp(url, "redis://", 8) != 0)
        bad_url(url, "only redis:// is supported (no rediss:// TLS, no unix:// socket)");
    const char *a = url + 8, *auth_end = a + strcspn(a, "/"), *h, *he, *pt = NULL;
    if (memchr(a, '@', (size_t)(auth_end - a)))
        bad_url(url, "no user or password support");
    if (strpbrk(a, "?#"))
        bad_url(url, "no query options");
    if (*a == '[') { /* [IPv6]:port */
        h = a + 1;
        he = memchr(h, ']', (size_t)(auth_end - h));
        if (!he || (he + 1 < auth_end && he[1] != ':'))
            bad_url(url, "bad [IPv6] host");
        if (he + 1 < auth_end)
            pt = he + 2;
    } else {
        h = a;
        he = memchr(a, ':', (size_t)(auth_end - a));
        if (he)
            pt = he + 1;
        else
            he = auth_end;
    }
    if (he == h || (size_t)(he - h) >= host_cap)
        bad_url(url, "no host, or a host name too long");
    memcpy(host, h, (size_t)(he - h));
    host[he - h] = 0;
    memcpy(port, "6379", 5);
    if (pt) {
        size_t pl = (size_t)(auth_end - pt);
        if (pl == 0 || pl > 5 || strspn(pt, "0123456789") < pl)
            bad_url(url, "bad port");
        memcpy(port, pt, pl);
        port[pl] = 0;
        long v = strtol(port, NULL, 10);
        if (v < 1 || v > 65535)
            bad_url(url, "bad port");
    }
    /* /db: a number; pub/sub channels are the same in every database, so it is not used */
    if (*auth_end == '/' && strspn(auth_end + 1, "0123456789") != strlen(auth_end + 1))
        bad_url(url, "the path must be a database number");
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        fatal(1, "redis host %s: %s", host, gai_strerror(rc));
    int fd = -1, err = 0;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        fatal(1, "cannot connect to redis at %s:%s: %s", host, port, strerror(err));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static int listen_on(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                    *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        fatal(1, "HOST %s: %s", host, gai_strerror(rc));
    int fd = -1, err = 0;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, BACKLOG) == 0)
            break;
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        fatal(1, "cannot listen on %s:%s: %s", host, port, strerror(err));
    return fd;
}

static void on_signal(int sig) {
    (void)sig;
    _exit(0); /* nothing to save; the kernel closes every socket */
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--self-test") == 0)
        return self_test();
    if (argc > 1)
        fatal(2, "usage: PORT=8000 HOST=127.0.0.1 BROADCAST_URL=redis://... floor "
                 "[--self-test]");

    const char *port = getenv("PORT"), *host = getenv("HOST"), *url = getenv("BROADCAST_URL");
    port = port && *port ? port : "8000";
    host = host && *host ? host : "127.0.0.1";
    url = url && *url ? url : "redis://127.0.0.1:6379/0";
    char *end;
    long pv = strtol(port, &end, 10);
    if (*end || pv < 1 || pv > 65535)
        fatal(2, "bad PORT %s", port);
    char redis_host[256], redis_port[6];
    parse_redis_url(url, redis_host, sizeof redis_host, redis_port);

    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN); /* sends use MSG_NOSIGNAL; this covers the rest */

    struct rlimit rl; /* one fd per client: as many as allowed */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        fatal(1, "epoll_create1: %s", strerror(errno));
    redis_fd = connect_to(redis_host, redis_port);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &redis_tag};
    redis_events = EPOLLIN;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, redis_fd, &ev) < 0)
        fatal(1, "epoll_ctl: %s", strerror(errno));
    listen_fd = listen_on(host, port);
    ev = (struct epoll_event){.events = EPOLLIN, .data.ptr = &listen_tag};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &ev) < 0)
        fatal(1, "epoll_ctl: %s", strerror(errno));
    fprintf(stderr, "floor: listening on %s:%s, redis at %s:%s\n", host, port, redis_host,
            redis_port);

    static struct epoll_event evs[512];
    double next_sweep = 0;
    for (;;) {
        int timed = nclosing > 0 || accept_paused;
        int n = epoll_wait(ep, evs, 512, timed ? 1000 : -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fatal(1, "epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            void *tag = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (tag == &listen_tag) {
                on_accept();
            } else if (tag == &redis_tag) {
                if (e & EPOLLOUT)
                    redis_flush();
                if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
                    on_redis_readable();
            } else {
                Conn *c = tag;
                if (c->state != ST_DEAD && (e & EPOLLOUT))
                    flush_out(c);
                if (c->state != ST_DEAD && (e & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                    on_readable(c);
            }
        }
        if (timed || nclosing || accept_paused) {
            double now = mono();
            if (now >= next_sweep) {
                sweep(now);
                next_sweep = now + 1.0;
            }
        }
        reap();
    }
}
