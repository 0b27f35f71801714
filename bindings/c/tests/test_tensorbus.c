/*
 * C tests of libtensorbus.
 *
 *     test_tensorbus TENSORBUS_BIN TB_PEER_BIN BROKER_CONFIG
 *
 * Starts `tensorbus broker` on a temporary socket, runs every test against
 * it (tb-peer, the Rust test peer, plays the other side of the cross-process
 * tests) and prints `N passed, M failed` last. Exit status 0 iff all passed.
 * `make -C bindings/c test` runs it under valgrind.
 */
#define _GNU_SOURCE
#include "tensorbus.h"

#include <errno.h>
#include <stddef.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int g_failed_checks;
static const char *g_socket;
static const char *g_tensorbus;
static const char *g_peer;

#define FAIL_AT(...)                                                  \
    do {                                                              \
        fprintf(stderr, "  %s:%d: ", __FILE__, __LINE__);             \
        fprintf(stderr, __VA_ARGS__);                                 \
        fprintf(stderr, "\n");                                        \
        g_failed_checks++;                                            \
    } while (0)

#define CHECK(cond)                                                   \
    do {                                                              \
        if (!(cond))                                                  \
            FAIL_AT("CHECK(%s) failed (last error: %s)", #cond,       \
                    tb_last_error_message());                         \
    } while (0)

/* Checks that `call` returns `want`. */
#define CHECK_ST(call, want)                                          \
    do {                                                              \
        tb_status s_ = (call);                                        \
        if (s_ != (want))                                             \
            FAIL_AT("%s returned %s, expected %s (last error: %s)",   \
                    #call, tb_status_str((int)s_),                    \
                    tb_status_str((int)(want)),                       \
                    tb_last_error_message());                         \
    } while (0)

#define CHECK_OK(call) CHECK_ST(call, TB_OK)

/* Checks that the last error message contains `needle`. */
#define CHECK_MSG(needle)                                             \
    do {                                                              \
        if (strstr(tb_last_error_message(), (needle)) == NULL)        \
            FAIL_AT("last error %s lacks %s",                         \
                    tb_last_error_message(), (needle));               \
    } while (0)

/* ------------------------------------------------------------ helpers -- */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* FNV-1a 64, as tb-peer computes it. */
static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x00000100000001b3ull;
    }
    return h;
}

/* The splitmix64 stream seeded by `seq`, as tb-peer's `fill`. */
static void fill(uint64_t seq, uint8_t *out, size_t n) {
    uint64_t state = seq ^ 0x005eed0f7e450b05ull;
    for (size_t off = 0; off < n; off += 8) {
        state += 0x9e3779b97f4a7c15ull;
        uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        for (size_t b = 0; b < 8 && off + b < n; b++)
            out[off + b] = (uint8_t)(z >> (8 * b));
    }
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static tb_client *connect_client(const char *name) {
    tb_client *c = NULL;
    tb_status s = tb_client_connect(g_socket, name, &c);
    if (s != TB_OK) {
        FAIL_AT("connect: %s: %s", tb_status_str((int)s), tb_last_error_message());
        return NULL;
    }
    return c;
}

/* A child process with a pipe to its stdin and one from its stdout. */
typedef struct {
    pid_t pid;
    int in;  /* write end: the child's stdin */
    int out; /* read end: the child's stdout */
} child;

static int spawn(char *const argv[], child *ch, int pipe_stdout) {
    int in[2], out[2];
    if (pipe(in) != 0 || pipe(out) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        dup2(in[0], 0);
        if (pipe_stdout)
            dup2(out[1], 1);
        close(in[0]);
        close(in[1]);
        close(out[0]);
        close(out[1]);
        execv(argv[0], argv);
        fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    ch->pid = pid;
    ch->in = in[1];
    ch->out = out[0];
    return 0;
}

/* Reads one line (without the newline); returns its length or -1 on EOF/timeout. */
static int read_line(int fd, char *buf, size_t cap, int timeout_ms) {
    size_t n = 0;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, timeout_ms) <= 0)
            return -1;
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r <= 0)
            return -1;
        if (c == '\n') {
            buf[n] = '\0';
            return (int)n;
        }
        if (n + 1 < cap)
            buf[n++] = c;
    }
}

/* Closes the child's pipes and waits for it; returns its exit status (or -1). */
static int finish_child(child *ch) {
    close(ch->in);
    close(ch->out);
    int st = 0;
    if (waitpid(ch->pid, &st, 0) != ch->pid)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* What `tensorbus stat --json` says about the object named `name` (a
 * channel or a client): the number after `"key": ` (1 / 0 for true /
 * false), or for `subscribers` the length of that array. -1 if the report
 * has no such field. */
static long stat_count(const char *name, const char *key) {
    char *argv[] = {(char *)g_tensorbus, "stat", "--json", "--socket", (char *)g_socket, NULL};
    child ch;
    if (spawn(argv, &ch, 1) != 0)
        return -1;
    static char buf[1 << 16];
    size_t n = 0;
    for (;;) {
        struct pollfd p = {.fd = ch.out, .events = POLLIN};
        if (poll(&p, 1, 20000) <= 0)
            break;
        ssize_t r = read(ch.out, buf + n, sizeof buf - 1 - n);
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    buf[n] = '\0';
    if (finish_child(&ch) != 0)
        return -1;
    char want[128], field[64];
    snprintf(want, sizeof want, "\"name\": \"%s\"", name);
    snprintf(field, sizeof field, "\"%s\": ", key);
    const char *at = strstr(buf, want);
    if (!at)
        return -1;
    at += strlen(want);
    const char *next = strstr(at, "\"name\": "); /* the next object's name */
    const char *f = strstr(at, field);
    if (!f || (next && f > next && strcmp(key, "subscribers") != 0))
        return -1;
    f += strlen(field);
    if (strncmp(f, "true", 4) == 0 || strncmp(f, "false", 5) == 0)
        return *f == 't';
    if (*f != '[')
        return strtol(f, NULL, 10);
    long count = 0;
    for (const char *q = f + 1; *q && *q != ']'; q++)
        count += strncmp(q, "\"handle\": ", 10) == 0;
    return count;
}

/* ------------------------------------------------------- test helpers -- */

/* Opens a producer and a consumer (`policy`, `depth`) on `channel`, checking both. */
static void open_pair(tb_client *c, const char *channel, tb_policy policy, uint32_t depth,
                      tb_producer **p, tb_consumer **cons) {
    CHECK_OK(tb_producer_open(c, channel, p));
    CHECK_OK(tb_consumer_open(c, channel, policy, depth, cons));
}

/* Closes `cons`, then `p`, then the client `c`, checking each. */
static void close_pair(tb_client *c, tb_producer *p, tb_consumer *cons) {
    CHECK_OK(tb_consumer_close(cons));
    CHECK_OK(tb_producer_close(p));
    CHECK_OK(tb_client_close(c));
}

/* Writes 0, 1, 2, ... (mod 256) into the `n` bytes at `data` (nothing if NULL). */
static void fill_counting(void *data, size_t n) {
    for (size_t i = 0; data && i < n; i++)
        ((uint8_t *)data)[i] = (uint8_t)i;
}

/* Loans a 1-D u8 tensor of `n` bytes from `p` and publishes it unchanged. */
static void loan_and_publish(tb_producer *p, size_t n) {
    tb_tensor *t = NULL;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
    CHECK_OK(tb_publish(t, NULL));
}

/* Loans a 1-D u8 tensor of `n` bytes from `p` and releases it unpublished. */
static void loan_and_release(tb_producer *p, size_t n) {
    tb_tensor *t = NULL;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
    CHECK_OK(tb_release(t)); /* an unpublished loan goes back */
}

/* Receives one tensor from `cons` within `timeout_ns` and releases it. */
static void recv_and_release(tb_consumer *cons, uint64_t timeout_ns) {
    tb_tensor *r = NULL;
    CHECK_OK(tb_recv(cons, timeout_ns, &r));
    CHECK_OK(tb_release(r));
}

/* What a received tensor says about itself (see read_meta). */
typedef struct {
    const void *data;
    size_t nbytes;
    const uint8_t *header;
    size_t header_len;
    uint64_t seq;
    tb_dtype dtype;
    size_t ndim;
    size_t dims[TB_MAX_DIMS];
} tensor_meta;

/* Reads `t`'s data, user header, sequence number, dtype and shape into `m`,
 * checking each call. Fields start as sentinels (seq, header_len and ndim at
 * their maximum, dtype 0), so a getter that leaves its output unwritten fails
 * the caller's checks. */
static void read_meta(const tb_tensor *t, tensor_meta *m) {
    memset(m, 0, sizeof *m);
    m->seq = UINT64_MAX;
    m->header_len = SIZE_MAX;
    m->ndim = SIZE_MAX;
    CHECK_OK(tb_tensor_const_data(t, &m->data, &m->nbytes));
    CHECK_OK(tb_tensor_user_header(t, &m->header, &m->header_len));
    CHECK_OK(tb_tensor_seq(t, &m->seq));
    CHECK_OK(tb_tensor_dtype(t, &m->dtype));
    CHECK_OK(tb_tensor_shape(t, &m->ndim, m->dims, TB_MAX_DIMS));
}

enum { CROSS_COUNT = 200 };

/* Spawns `tb-peer ROLE --socket S --channel CHANNEL --count CROSS_COUNT OPT VALUE`
 * with its stdout piped to us; returns 0, or -1 after a failed check. */
static int spawn_peer(const char *role, const char *channel, const char *opt, const char *value,
                      child *ch) {
    char count[16];
    snprintf(count, sizeof count, "%d", CROSS_COUNT);
    char *argv[] = {(char *)g_peer, (char *)role,  "--socket",     (char *)g_socket,
                    "--channel",    (char *)channel, "--count",    count,
                    (char *)opt,    (char *)value,   NULL};
    if (spawn(argv, ch, 1) != 0) {
        FAIL_AT("cannot spawn %s", g_peer);
        return -1;
    }
    return 0;
}

/* -------------------------------------------------------------- tests -- */

static void test_connect_and_open_errors(void) {
    tb_client *c = (tb_client *)0x1;
    CHECK_ST(tb_client_connect("/nonexistent/tb/broker.sock", "c-test", &c),
             TB_ERR_BROKER_UNAVAILABLE);
    CHECK(c == NULL);
    CHECK_MSG("tensorbus broker");

    c = connect_client("c-test");
    if (!c)
        return;
    uint32_t id = 0;
    CHECK_OK(tb_client_id(c, &id));

    tb_consumer *cons = NULL;
    CHECK_ST(tb_consumer_open(c, "c/nope", TB_POLICY_DEFAULT, 0, &cons), TB_ERR_NO_CHANNEL);
    CHECK(cons == NULL);
    CHECK_MSG("c/bcast"); /* the message lists the known channels */
    tb_producer *p = NULL;
    CHECK_ST(tb_producer_open(c, "c/nope", &p), TB_ERR_NO_CHANNEL);
    CHECK_ST(tb_producer_open(c, "../x", &p), TB_ERR_INVALID_ARGUMENT);
    CHECK(p == NULL);
    CHECK_OK(tb_client_close(c));
}

static void test_publish_and_receive(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    uint32_t id = 0;
    CHECK_OK(tb_client_id(c, &id));
    tb_producer *p = NULL;
    tb_consumer *c1 = NULL, *c2 = NULL;
    open_pair(c, "c/bcast", TB_POLICY_DEFAULT, 0, &p, &c1);
    CHECK_OK(tb_consumer_open(c, "c/bcast", TB_POLICY_DROP_OLDEST, 2, &c2));

    size_t shape[2] = {16, 16};
    tb_tensor *t = NULL;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 2, shape, &t));
    void *data = NULL;
    size_t nbytes = 0;
    CHECK_OK(tb_tensor_data(t, &data, &nbytes));
    CHECK(data != NULL && nbytes == 256);
    fill_counting(data, nbytes);
    CHECK_OK(tb_tensor_set_user_header(t, "hello", 5));
    uint64_t before = now_ns();
    uint32_t delivered = 0;
    CHECK_OK(tb_publish(t, &delivered));
    CHECK(delivered == 2);

    tb_tensor *r1 = NULL, *r2 = NULL;
    CHECK_OK(tb_recv(c1, 1000000000ull, &r1));
    CHECK_OK(tb_recv(c2, 0, &r2));
    if (r1 && r2) {
        tensor_meta m;
        read_meta(r1, &m);
        CHECK(m.ndim == 2 && m.dims[0] == 16 && m.dims[1] == 16);
        CHECK(m.dtype == TB_DTYPE_U8);
        CHECK(m.seq == 0);
        uint64_t ts = 0;
        CHECK_OK(tb_tensor_timestamp_ns(r1, &ts));
        CHECK(ts >= before && ts <= now_ns());
        uint32_t pid = 0;
        CHECK_OK(tb_tensor_producer_id(r1, &pid));
        CHECK(pid == id);
        CHECK(m.header_len == 5 && m.header && memcmp(m.header, "hello", 5) == 0);

        const void *cd1 = m.data, *cd2 = NULL;
        size_t n1 = m.nbytes;
        CHECK_OK(tb_tensor_const_data(r2, &cd2, NULL));
        /* Zero copy: the very bytes the loan wrote, at the same address. */
        CHECK(cd1 == data && cd2 == data && n1 == 256);
        int same = 1;
        for (size_t i = 0; cd1 && i < n1; i++)
            same &= ((const uint8_t *)cd1)[i] == (uint8_t)i;
        CHECK(same);

        /* Received data is const. */
        void *w = (void *)0x1;
        size_t wn = 99;
        CHECK_ST(tb_tensor_data(r1, &w, &wn), TB_ERR_READ_ONLY);
        CHECK(w == NULL && wn == 0); /* like the out-handles: NULL on error */
        CHECK_ST(tb_tensor_set_user_header(r1, "x", 1), TB_ERR_READ_ONLY);
        CHECK_ST(tb_publish(r1, NULL), TB_ERR_INVALID_ARGUMENT);
    }
    CHECK_OK(tb_release(r1));
    CHECK_OK(tb_release(r2));

    /* A second tensor: f32, sequence 1. */
    size_t shape2[2] = {3, 4};
    CHECK_OK(tb_loan(p, TB_DTYPE_F32, 2, shape2, &t));
    CHECK_OK(tb_tensor_data(t, &data, &nbytes));
    CHECK(nbytes == 48);
    if (data)
        for (int i = 0; i < 12; i++)
            ((float *)data)[i] = (float)i * 0.5f;
    CHECK_OK(tb_publish(t, NULL));
    CHECK_OK(tb_recv(c1, TB_TIMEOUT_INFINITE, &r1));
    if (r1) {
        tensor_meta m;
        read_meta(r1, &m);
        CHECK(m.seq == 1 && m.dtype == TB_DTYPE_F32 && m.nbytes == 48);
        CHECK(m.data && ((const float *)m.data)[11] == 5.5f);
        CHECK(m.header_len == 0);
    }
    CHECK_OK(tb_release(r1));
    recv_and_release(c2, 1000000000ull);

    CHECK_OK(tb_consumer_close(c1));
    close_pair(c, p, c2);
}

static void test_timeouts(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    tb_consumer *cons = NULL;
    CHECK_OK(tb_consumer_open(c, "c/out", TB_POLICY_BLOCK, 4, &cons));
    tb_tensor *t = (tb_tensor *)0x1;
    CHECK_ST(tb_recv(cons, 0, &t), TB_ERR_TIMEOUT);
    CHECK(t == NULL);
    uint64_t start = now_ns();
    CHECK_ST(tb_recv(cons, 50000000ull, &t), TB_ERR_TIMEOUT);
    uint64_t took = now_ns() - start;
    CHECK(took >= 45000000ull);
    CHECK_MSG("no tensor arrived");
    CHECK_OK(tb_consumer_close(cons));
    CHECK_OK(tb_client_close(c));
}

static void test_pool_exhausted_and_too_large(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_consumer *cons = NULL;
    open_pair(c, "c/tiny", TB_POLICY_BLOCK, 4, &p, &cons);
    size_t n = 100;
    tb_tensor *t = NULL;
    for (int i = 0; i < 2; i++)
        loan_and_publish(p, n);
    /* Both slots of pool "tiny" are queued to the consumer. A failed loan
     * clears its out pointer. */
    t = (tb_tensor *)0x1;
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 1, &n, &t), TB_ERR_POOL_EXHAUSTED);
    CHECK(t == NULL);
    CHECK_MSG("exhausted");
    CHECK_ST(tb_loan_timeout(p, TB_DTYPE_U8, 1, &n, 20000000ull, &t), TB_ERR_TIMEOUT);

    tb_tensor *r[2] = {NULL, NULL};
    CHECK_OK(tb_recv(cons, 1000000000ull, &r[0]));
    CHECK_OK(tb_recv(cons, 1000000000ull, &r[1]));
    CHECK_OK(tb_release(r[0]));
    CHECK_OK(tb_release(r[1]));
    loan_and_release(p, n);

    size_t big = 8192;
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 1, &big, &t), TB_ERR_TOO_LARGE);
    CHECK_MSG("4096");
    /* After a failed loan the producer can loan again. */
    loan_and_release(p, n);

    close_pair(c, p, cons);
}

static void test_stage_in_place(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_stage *st = NULL;
    tb_consumer *out = NULL;
    CHECK_OK(tb_producer_open(c, "c/work", &p));
    CHECK_OK(tb_stage_open(c, "c/work", "c/out", &st));
    CHECK_OK(tb_consumer_open(c, "c/out", TB_POLICY_BLOCK, 4, &out));
    tb_stage *bad = NULL;
    CHECK_ST(tb_stage_open(c, "c/bcast", "c/out", &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("workqueue");

    size_t n = 1024;
    tb_tensor *t = NULL;
    void *a = NULL, *a2 = NULL;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
    CHECK_OK(tb_tensor_data(t, &a, NULL));
    fill_counting(a, n);
    uint32_t delivered = 0;
    CHECK_OK(tb_publish(t, &delivered));
    CHECK(delivered == 1);
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t)); /* a second one, queued behind */
    CHECK_OK(tb_tensor_data(t, &a2, NULL));
    if (a2)
        memset(a2, 7, n);
    CHECK_OK(tb_publish(t, &delivered));
    CHECK(delivered == 1);

    tb_tensor *s = NULL;
    CHECK_OK(tb_recv_mut(st, 1000000000ull, &s));
    if (s) {
        void *b = NULL;
        size_t nb = 0;
        CHECK_OK(tb_tensor_data(s, &b, &nb));
        CHECK(b == a && nb == n); /* the same slot, writable in place */
        for (size_t i = 0; b && i < nb; i++)
            ((uint8_t *)b)[i] = (uint8_t)(((uint8_t *)b)[i] + 1);
        CHECK_OK(tb_tensor_set_user_header(s, "staged", 6));
        /* A stage may hold several tensors: the second one, while holding the first. */
        tb_tensor *s2 = NULL;
        CHECK_OK(tb_recv_mut(st, 1000000000ull, &s2));
        void *b2 = NULL;
        size_t nb2 = 0;
        CHECK_OK(tb_tensor_data(s2, &b2, &nb2));
        CHECK(b2 == a2 && b2 != b && nb2 == n);
        CHECK(b2 && ((uint8_t *)b2)[0] == 7 && ((uint8_t *)b2)[n - 1] == 7);
        CHECK_OK(tb_release(s2)); /* given back unforwarded */
        CHECK_ST(tb_publish(s, NULL), TB_ERR_INVALID_ARGUMENT);
        CHECK_OK(tb_forward(s, &delivered));
        CHECK(delivered == 1);
    }

    tb_tensor *r = NULL;
    CHECK_OK(tb_recv(out, 1000000000ull, &r));
    if (r) {
        const void *d = NULL;
        size_t nd = 0;
        CHECK_OK(tb_tensor_const_data(r, &d, &nd));
        CHECK(d == a && nd == n);
        int ok = 1;
        for (size_t i = 0; d && i < nd; i++)
            ok &= ((const uint8_t *)d)[i] == (uint8_t)(i + 1);
        CHECK(ok);
        const uint8_t *h = NULL;
        size_t hl = 0;
        CHECK_OK(tb_tensor_user_header(r, &h, &hl));
        CHECK(hl == 6 && memcmp(h, "staged", 6) == 0);
        CHECK_ST(tb_forward(r, NULL), TB_ERR_INVALID_ARGUMENT);
    }
    CHECK_OK(tb_release(r));
    /* Nothing queued: recv_mut times out and the stage is free again. */
    CHECK_ST(tb_recv_mut(st, 0, &s), TB_ERR_TIMEOUT);
    CHECK_OK(tb_consumer_close(out));
    CHECK_OK(tb_stage_close(st));
    CHECK_OK(tb_producer_close(p));
    CHECK_OK(tb_client_close(c));
}

/* Issue 11.1: a stage whose output is its own work-queue input (a retry
 * loop). The forward used to clear the hold of the queued tensor: the next
 * recv_mut said TB_ERR_CORRUPTED and the slot was free while queued. */
static void test_stage_into_own_input(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_stage *st = NULL;
    CHECK_OK(tb_producer_open(c, "c/loop", &p));
    CHECK_OK(tb_stage_open(c, "c/loop", "c/loop", &st));
    size_t n = 16;
    tb_tensor *t = NULL;
    void *a = NULL;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
    CHECK_OK(tb_tensor_data(t, &a, NULL));
    memset(a, 0, n);
    CHECK_OK(tb_publish(t, NULL));
    for (int round = 0; round < 50; round++) {
        tb_tensor *s = NULL;
        CHECK_OK(tb_recv_mut(st, 1000000000ull, &s));
        if (!s)
            break;
        void *b = NULL;
        CHECK_OK(tb_tensor_data(s, &b, NULL));
        CHECK(b != NULL && ((uint8_t *)b)[0] == (uint8_t)round);
        if (b)
            ((uint8_t *)b)[0]++;
        uint32_t delivered = 0;
        CHECK_OK(tb_forward(s, &delivered));
        CHECK(delivered == 1);
    }
    tb_tensor *last = NULL;
    CHECK_OK(tb_recv_mut(st, 1000000000ull, &last));
    if (last) {
        const void *d = NULL;
        CHECK_OK(tb_tensor_const_data(last, &d, NULL));
        CHECK(d != NULL && ((const uint8_t *)d)[0] == 50);
        CHECK_OK(tb_release(last));
    }
    tb_tensor *none = NULL;
    CHECK_ST(tb_recv_mut(st, 0, &none), TB_ERR_TIMEOUT);
    CHECK_OK(tb_stage_close(st));
    CHECK_OK(tb_producer_close(p));
    CHECK_OK(tb_client_close(c));
}

static void *other_thread_error(void *arg) {
    (void)arg;
    /* The last error is per thread: this thread has none yet. */
    return (void *)(uintptr_t)(tb_last_error_message()[0] == '\0');
}

static void test_misuse(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_consumer *cons = NULL;
    open_pair(c, "c/bcast", TB_POLICY_DEFAULT, 0, &p, &cons);
    size_t n = 64;
    tb_tensor *t = NULL;

    /* NULL arguments. */
    CHECK_ST(tb_client_connect(g_socket, "x", NULL), TB_ERR_INVALID_ARGUMENT);
    tb_client *c2 = NULL;
    CHECK_ST(tb_client_connect(g_socket, NULL, &c2), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_client_close(NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("NULL");
    tb_producer *px = (tb_producer *)0x1;
    CHECK_ST(tb_producer_open(NULL, "c/bcast", &px), TB_ERR_INVALID_ARGUMENT);
    CHECK(px == NULL); /* out is cleared on failure */
    CHECK_ST(tb_producer_open(c, NULL, &px), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_loan(NULL, TB_DTYPE_U8, 1, &n, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 1, &n, NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 1, NULL, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_recv(NULL, 0, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_release(NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_publish(NULL, NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_forward(NULL, NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_recv_mut(NULL, 0, &t), TB_ERR_INVALID_ARGUMENT);
    void *d = NULL;
    CHECK_ST(tb_tensor_data(NULL, &d, NULL), TB_ERR_INVALID_ARGUMENT);
    uint64_t u = 0;
    CHECK_ST(tb_tensor_seq(NULL, &u), TB_ERR_INVALID_ARGUMENT);

    /* Bad dtype, rank, policy. */
    CHECK_ST(tb_loan(p, 99, 1, &n, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("dtype");
    size_t nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 9, nine, &t), TB_ERR_INVALID_ARGUMENT);
    tb_consumer *c3 = NULL;
    CHECK_ST(tb_consumer_open(c, "c/bcast", 42, 0, &c3), TB_ERR_INVALID_ARGUMENT);

    /* Foreign and wrong-kind pointers are never dereferenced. */
    int on_stack = 0;
    CHECK_ST(tb_release((tb_tensor *)&on_stack), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_release((tb_tensor *)p), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("tb_producer");
    CHECK_ST(tb_producer_close((tb_producer *)cons), TB_ERR_INVALID_ARGUMENT);

    /* Extents are 32-bit: one above UINT32_MAX is refused before any
     * loan, UINT32_MAX itself is a (too large) tensor. */
    tb_tensor *tw = (tb_tensor *)0x1;
#if SIZE_MAX > UINT32_MAX
    size_t wide[2] = {(size_t)UINT32_MAX + 1, 1};
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 2, wide, &tw), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("per-axis limit");
    CHECK(tw == NULL);
#endif
    size_t widest[2] = {1, UINT32_MAX};
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 2, widest, &tw), TB_ERR_TOO_LARGE);

    /* Several loans of one producer at a time; a client with open handles
     * refuses to close. */
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
    tb_tensor *t2 = NULL;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t2));
    void *d1 = NULL, *d2 = NULL;
    CHECK_OK(tb_tensor_data(t, &d1, NULL));
    CHECK_OK(tb_tensor_data(t2, &d2, NULL));
    CHECK(t2 != NULL && t2 != t && d1 != NULL && d2 != NULL && d1 != d2);
    CHECK_OK(tb_release(t2));
    CHECK_ST(tb_client_close(c), TB_ERR_BUSY);
    CHECK_MSG("open handle");
    size_t ndim = 0, dims[1];
    CHECK_ST(tb_tensor_shape(t, &ndim, dims, 0), TB_ERR_INVALID_ARGUMENT);
    CHECK(ndim == 1);
    char big[TB_USER_HEADER_LEN + 1] = {0};
    CHECK_ST(tb_tensor_set_user_header(t, big, sizeof big), TB_ERR_INVALID_ARGUMENT);
    CHECK_OK(tb_publish(t, NULL));

    /* Double release and use after release. */
    tb_tensor *r = NULL;
    CHECK_OK(tb_recv(cons, 1000000000ull, &r));
    CHECK_OK(tb_release(r));
    CHECK_ST(tb_release(r), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("tensor already released");
    const void *cd = NULL;
    CHECK_ST(tb_tensor_const_data(r, &cd, NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_publish(t, NULL), TB_ERR_INVALID_ARGUMENT); /* already published */
    CHECK_MSG("already released");

    /* Stale (closed) handles. */
    CHECK_OK(tb_consumer_close(cons));
    CHECK_ST(tb_recv(cons, 0, &r), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("already closed");
    CHECK_ST(tb_consumer_close(cons), TB_ERR_INVALID_ARGUMENT);
    CHECK_OK(tb_producer_close(p));
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 1, &n, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("tb_producer already closed");

    /* Status names and the per-thread last error. */
    CHECK(strcmp(tb_status_str(TB_ERR_TIMEOUT), "TB_ERR_TIMEOUT") == 0);
    CHECK(strcmp(tb_status_str(12345), "TB_ERR_UNKNOWN_STATUS") == 0);
    CHECK(tb_last_error_message()[0] != '\0');
    pthread_t th;
    void *empty = NULL;
    CHECK(pthread_create(&th, NULL, other_thread_error, NULL) == 0);
    CHECK(pthread_join(th, &empty) == 0);
    CHECK(empty == (void *)1);

    CHECK_OK(tb_client_close(c));
    CHECK_ST(tb_client_close(c), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_producer_open(c, "c/bcast", &p), TB_ERR_INVALID_ARGUMENT);
}

/* Checks that `t` is `n` bytes of `byte` with sequence number `seq`. */
static void check_bytes(const tb_tensor *t, size_t n, uint8_t byte, uint64_t seq) {
    tensor_meta m;
    read_meta(t, &m);
    int same = m.data != NULL && m.nbytes == n;
    for (size_t i = 0; same && i < n; i++)
        same = ((const uint8_t *)m.data)[i] == byte;
    CHECK(same);
    CHECK(m.seq == seq);
}

/* Loans `n` bytes of `byte` from `p` and publishes them; returns how many
 * subscribers got them (UINT32_MAX after a failed call). */
static uint32_t publish_bytes(tb_producer *p, size_t n, uint8_t byte) {
    tb_tensor *t = NULL;
    void *d = NULL;
    uint32_t delivered = UINT32_MAX;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
    CHECK_OK(tb_tensor_data(t, &d, NULL));
    if (d)
        memset(d, byte, n);
    CHECK_OK(tb_publish(t, &delivered));
    return delivered;
}

/* Tensors outlive their handle: closing a producer, consumer or stage whose
 * tensors are alive succeeds and the tensors stay valid (a loan is still
 * published, a staged tensor still forwarded, received bytes still read);
 * a closed consumer or stage gets nothing more from that moment on, and
 * its broker handle closes when its last tensor goes. */
static void test_close_with_live_tensors(void) {
    tb_client *c = connect_client("c-close");
    if (!c)
        return;
    tb_producer *p = NULL, *p2 = NULL;
    tb_consumer *cons = NULL;
    open_pair(c, "c/close", TB_POLICY_BLOCK, 8, &p, &cons);
    CHECK_OK(tb_producer_open(c, "c/close", &p2));
    CHECK(stat_count("c/close", "producers") == 2);
    CHECK(stat_count("c/close", "subscribers") == 1);
    CHECK(stat_count("c-close", "handles") == 3);

    /* Three loans of one producer at once. */
    size_t n = 64;
    tb_tensor *l[3] = {NULL, NULL, NULL};
    void *d[3] = {NULL, NULL, NULL};
    for (int i = 0; i < 3; i++) {
        CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &l[i]));
        CHECK_OK(tb_tensor_data(l[i], &d[i], NULL));
        if (d[i])
            memset(d[i], 0xa0 + i, n);
    }
    CHECK(d[0] != d[1] && d[1] != d[2] && d[0] != d[2]);
    uint32_t delivered = 0;
    CHECK_OK(tb_publish(l[2], &delivered)); /* sequence numbers follow publishes */
    CHECK(delivered == 1);

    /* The producer closes with two loans alive; they keep working. */
    CHECK_OK(tb_producer_close(p));
    tb_tensor *t = NULL;
    CHECK_ST(tb_loan(p, TB_DTYPE_U8, 1, &n, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("tb_producer already closed");
    CHECK(stat_count("c/close", "producers") == 2); /* the loans keep its broker handle */
    void *w = NULL;
    size_t wn = 0;
    CHECK_OK(tb_tensor_data(l[0], &w, &wn));
    CHECK(w == d[0] && wn == n);
    CHECK_OK(tb_tensor_set_user_header(l[0], "orphan", 6));
    CHECK_OK(tb_publish(l[0], &delivered));
    CHECK(delivered == 1);
    CHECK_OK(tb_release(l[1])); /* the last loan: the broker handle closes */
    CHECK(stat_count("c/close", "producers") == 1);
    CHECK(stat_count("c-close", "handles") == 2);

    /* The consumer closes holding two tensors, a third queued for it. */
    tb_tensor *r[2] = {NULL, NULL};
    CHECK_OK(tb_recv(cons, 1000000000ull, &r[0]));
    CHECK_OK(tb_recv(cons, 1000000000ull, &r[1]));
    CHECK(publish_bytes(p2, n, 0xb0) == 1);
    CHECK_OK(tb_consumer_close(cons));
    CHECK(stat_count("c/close", "subscribers") == 0); /* it left the channel at once */
    CHECK_ST(tb_recv(cons, 0, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("tb_consumer already closed");
    CHECK(publish_bytes(p2, n, 0xb1) == 0); /* nobody receives it any more */
    /* The received tensors still read what was published. */
    if (r[0] && r[1]) {
        check_bytes(r[0], n, 0xa2, 0);
        check_bytes(r[1], n, 0xa0, 1);
        const uint8_t *h = NULL;
        size_t hl = 0;
        CHECK_OK(tb_tensor_user_header(r[1], &h, &hl));
        CHECK(hl == 6 && h && memcmp(h, "orphan", 6) == 0);
    }
    CHECK(stat_count("c-close", "handles") == 2); /* p2, and the consumer's tensors */
    CHECK_OK(tb_release(r[0]));
    CHECK_OK(tb_release(r[1]));
    CHECK(stat_count("c-close", "handles") == 1);

    /* The stage closes holding a tensor: it leaves the work queue at once,
     * and the tensor is still written in place and forwarded. */
    tb_stage *st = NULL;
    tb_producer *pw = NULL;
    tb_consumer *out = NULL;
    CHECK_OK(tb_stage_open(c, "c/close-wq", "c/close", &st));
    CHECK_OK(tb_producer_open(c, "c/close-wq", &pw));
    CHECK_OK(tb_consumer_open(c, "c/close", TB_POLICY_BLOCK, 8, &out));
    CHECK(publish_bytes(pw, n, 0x5a) == 1);
    tb_tensor *s = NULL;
    CHECK_OK(tb_recv_mut(st, 1000000000ull, &s));
    CHECK(stat_count("c/close-wq", "subscribers") == 1);
    CHECK_OK(tb_stage_close(st));
    CHECK(stat_count("c/close-wq", "subscribers") == 0);
    CHECK_ST(tb_recv_mut(st, 0, &t), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("tb_stage already closed");
    CHECK(publish_bytes(pw, n, 0x5f) == 0); /* no worker left */
    void *b = NULL;
    size_t nb = 0;
    CHECK_OK(tb_tensor_data(s, &b, &nb));
    CHECK(b != NULL && nb == n);
    for (size_t i = 0; b && i < nb; i++)
        ((uint8_t *)b)[i]++;
    CHECK_OK(tb_forward(s, &delivered));
    CHECK(delivered == 1);
    CHECK_OK(tb_recv(out, 1000000000ull, &t));
    if (t) {
        check_bytes(t, n, 0x5b, 0); /* the stage's output producer: its first */
        const void *cd = NULL;
        CHECK_OK(tb_tensor_const_data(t, &cd, NULL));
        CHECK(cd == b); /* the very slot, forwarded after close */
    }
    CHECK_OK(tb_release(t));
    CHECK_ST(tb_recv(out, 0, &t), TB_ERR_TIMEOUT);

    CHECK_OK(tb_consumer_close(out));
    CHECK_OK(tb_producer_close(pw));
    CHECK_OK(tb_producer_close(p2));
    CHECK_OK(tb_client_close(c));
}

enum { THREAD_TENSORS = 200 };

/* One producer shared by two publishing threads (ids base, base+1, ...). */
typedef struct {
    tb_producer *p;
    uint32_t base;
    int bad;
} publisher_arg;

static void *publisher(void *arg) {
    publisher_arg *a = arg;
    for (uint32_t i = 0; i < THREAD_TENSORS; i++) {
        tb_tensor *t = NULL;
        size_t n = 8;
        void *d = NULL;
        if (tb_loan_timeout(a->p, TB_DTYPE_U8, 1, &n, 10000000000ull, &t) != TB_OK) {
            a->bad++;
            continue;
        }
        uint32_t id = a->base + i;
        if (tb_tensor_data(t, &d, NULL) == TB_OK && d)
            memcpy(d, &id, 4);
        else
            a->bad++;
        if (tb_publish(t, NULL) != TB_OK)
            a->bad++;
    }
    return NULL;
}

/* One consumer shared by two receiving threads: each id arrives once. */
typedef struct {
    tb_consumer *c;
    pthread_mutex_t *mu;
    unsigned char *seen; /* by id */
    int *total;
    int bad;
} receiver_arg;

static void *receiver(void *arg) {
    receiver_arg *a = arg;
    uint64_t deadline = now_ns() + 30000000000ull;
    for (;;) {
        pthread_mutex_lock(a->mu);
        int done = *a->total == 2 * THREAD_TENSORS;
        pthread_mutex_unlock(a->mu);
        if (done || now_ns() > deadline)
            return NULL;
        tb_tensor *t = NULL;
        tb_status s = tb_recv(a->c, 50000000ull, &t);
        if (s == TB_ERR_TIMEOUT)
            continue;
        const void *d = NULL;
        size_t n = 0;
        uint32_t id = UINT32_MAX;
        if (s != TB_OK || tb_tensor_const_data(t, &d, &n) != TB_OK || !d || n != 8) {
            a->bad++;
        } else {
            memcpy(&id, d, 4);
        }
        pthread_mutex_lock(a->mu);
        if (id < 2 * THREAD_TENSORS) {
            a->seen[id]++;
            (*a->total)++;
        }
        pthread_mutex_unlock(a->mu);
        if (s == TB_OK && tb_release(t) != TB_OK)
            a->bad++;
    }
}

/* Producers and consumers may be used from several threads at once. */
static void test_threads(void) {
    tb_client *c = connect_client("c-threads");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_consumer *cons = NULL;
    open_pair(c, "c/bcast", TB_POLICY_BLOCK, 8, &p, &cons);
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    unsigned char seen[2 * THREAD_TENSORS] = {0};
    int total = 0;
    publisher_arg pa[2] = {{p, 0, 0}, {p, THREAD_TENSORS, 0}};
    receiver_arg ra[2] = {{cons, &mu, seen, &total, 0}, {cons, &mu, seen, &total, 0}};
    pthread_t th[4];
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&th[i], NULL, receiver, &ra[i]) == 0);
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&th[2 + i], NULL, publisher, &pa[i]) == 0);
    for (int i = 0; i < 4; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    CHECK(pa[0].bad == 0 && pa[1].bad == 0);
    CHECK(ra[0].bad == 0 && ra[1].bad == 0);
    CHECK(total == 2 * THREAD_TENSORS);
    int once = 1;
    for (int i = 0; i < 2 * THREAD_TENSORS; i++)
        once &= seen[i] == 1;
    CHECK(once);
    close_pair(c, p, cons);
}

/* More tensors than the registry's quarantine holds: old shells are reused
 * or freed (valgrind checks that), double release is still detected. */
static void test_many_tensors(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_consumer *cons = NULL;
    open_pair(c, "c/bcast", TB_POLICY_BLOCK, 8, &p, &cons);
    size_t n = 32;
    for (int i = 0; i < 3000; i++) {
        if (i % 2) {
            loan_and_publish(p, n);
            recv_and_release(cons, 1000000000ull);
        } else {
            loan_and_release(p, n);
        }
        if (g_failed_checks)
            break;
    }
    tb_tensor *t = NULL;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
    CHECK_OK(tb_release(t));
    CHECK_ST(tb_release(t), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("tensor already released");
    close_pair(c, p, cons);
}

/* A drop_oldest subscriber of depth 2 that reads nothing misses 3 of 5
 * tensors and says so; a block subscriber beside it misses none. */
static void test_dropped_counter(void) {
    tb_client *c = connect_client("c-test");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_consumer *block = NULL, *lossy = NULL;
    open_pair(c, "c/bcast", TB_POLICY_BLOCK, 8, &p, &block);
    CHECK_OK(tb_consumer_open(c, "c/bcast", TB_POLICY_DROP_OLDEST, 2, &lossy));
    for (int i = 0; i < 5; i++)
        loan_and_publish(p, 8);
    uint64_t dropped = 42;
    CHECK_OK(tb_consumer_dropped(lossy, &dropped));
    CHECK(dropped == 3);
    CHECK_OK(tb_consumer_dropped(block, &dropped));
    CHECK(dropped == 0);
    CHECK_ST(tb_consumer_dropped(lossy, NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_consumer_dropped(NULL, &dropped), TB_ERR_INVALID_ARGUMENT);
    for (int i = 0; i < 2; i++)
        recv_and_release(lossy, 0);
    for (int i = 0; i < 5; i++)
        recv_and_release(block, 0);
    CHECK_OK(tb_consumer_close(lossy));
    close_pair(c, p, block);
}

static void test_c_producer_rust_consumer(void) {
    tb_client *c = connect_client("c-producer");
    if (!c)
        return;
    tb_producer *p = NULL;
    CHECK_OK(tb_producer_open(c, "c/c2r", &p));
    child ch;
    if (spawn_peer("consumer", "c/c2r", "--policy", "block", &ch) != 0) {
        tb_producer_close(p);
        tb_client_close(c);
        return;
    }
    char line[256];
    CHECK(read_line(ch.out, line, sizeof line, 20000) > 0 && strncmp(line, "ready", 5) == 0);

    uint8_t h[16];
    for (uint64_t seq = 0; seq < CROSS_COUNT; seq++) {
        size_t n = (seq % 10 == 9) ? 100000 : 1000 + (size_t)seq * 7; /* some go to pool "big" */
        tb_tensor *t = NULL;
        tb_status s = tb_loan_timeout(p, TB_DTYPE_U8, 1, &n, 10000000000ull, &t);
        if (s != TB_OK) {
            FAIL_AT("loan %llu: %s", (unsigned long long)seq, tb_last_error_message());
            break;
        }
        void *d = NULL;
        CHECK_OK(tb_tensor_data(t, &d, NULL));
        fill(seq, d, n);
        put_le64(h, fnv1a(d, n));
        put_le64(h + 8, seq);
        CHECK_OK(tb_tensor_set_user_header(t, h, sizeof h));
        CHECK_OK(tb_publish(t, NULL));
    }

    int msgs = 0, ok = 0, end = -1;
    while (read_line(ch.out, line, sizeof line, 20000) >= 0) {
        unsigned long long s, ms;
        int good;
        if (sscanf(line, "msg %llu %llu %d", &s, &ms, &good) == 3) {
            msgs++;
            ok += good == 1;
        } else if (sscanf(line, "end %d", &end) == 1) {
            break;
        }
    }
    CHECK(msgs == CROSS_COUNT);
    CHECK(ok == CROSS_COUNT);
    CHECK(end == CROSS_COUNT);
    CHECK(finish_child(&ch) == 0);
    CHECK_OK(tb_producer_close(p));
    CHECK_OK(tb_client_close(c));
}

static void test_rust_producer_c_consumer(void) {
    tb_client *c = connect_client("c-consumer");
    if (!c)
        return;
    tb_consumer *cons = NULL;
    CHECK_OK(tb_consumer_open(c, "c/r2c", TB_POLICY_BLOCK, 8, &cons));
    child ch;
    if (spawn_peer("producer", "c/r2c", "--size", "6000", &ch) != 0) {
        tb_consumer_close(cons);
        tb_client_close(c);
        return;
    }
    uint8_t *expect = malloc(6000);
    int ok = 0;
    for (uint64_t i = 0; i < CROSS_COUNT; i++) {
        tb_tensor *t = NULL;
        tb_status s = tb_recv(cons, 20000000000ull, &t);
        if (s != TB_OK) {
            FAIL_AT("recv %llu: %s: %s", (unsigned long long)i, tb_status_str((int)s),
                    tb_last_error_message());
            break;
        }
        tensor_meta m;
        read_meta(t, &m);
        fill(i, expect, 6000);
        int good = m.data && m.nbytes == 6000 && m.ndim == 1 && m.dims[0] == 6000 &&
                   m.dtype == TB_DTYPE_U8 && m.seq == i && m.header_len == 16 &&
                   le64(m.header) == fnv1a(m.data, m.nbytes) && le64(m.header + 8) == i &&
                   memcmp(m.data, expect, m.nbytes) == 0;
        if (!good)
            FAIL_AT("tensor %llu does not verify", (unsigned long long)i);
        ok += good;
        CHECK_OK(tb_release(t));
    }
    free(expect);
    CHECK(ok == CROSS_COUNT);
    char line[256];
    int done = -1;
    while (read_line(ch.out, line, sizeof line, 20000) >= 0)
        if (sscanf(line, "done %d", &done) == 1)
            break;
    CHECK(done == CROSS_COUNT);
    CHECK(finish_child(&ch) == 0);
    CHECK_OK(tb_consumer_close(cons));
    CHECK_OK(tb_client_close(c));
}

/* In a forked child, checks that `call` fails with TB_ERR_FORKED_CHILD and
 * a message naming the fork (no CHECK: the child reports by exit status). */
#define CHILD_FORKED(call)                                                        \
    do {                                                                          \
        tb_status s_ = (call);                                                    \
        if (s_ != TB_ERR_FORKED_CHILD ||                                          \
            strstr(tb_last_error_message(), "before fork()") == NULL) {           \
            fprintf(stderr, "  child: %s returned %s (%s), expected TB_ERR_FORKED_CHILD\n", \
                    #call, tb_status_str((int)s_), tb_last_error_message());      \
            bad++;                                                                \
        }                                                                         \
    } while (0)

#define CHILD_OK(call)                                                            \
    do {                                                                          \
        tb_status s_ = (call);                                                    \
        if (s_ != TB_OK) {                                                        \
            fprintf(stderr, "  child: %s returned %s (%s)\n", #call,               \
                    tb_status_str((int)s_), tb_last_error_message());             \
            bad++;                                                                \
        }                                                                         \
    } while (0)

/* Issue 12.4: a forked child's inherited handles are inert. Every use fails
 * with TB_ERR_FORKED_CHILD, closing them (and publishing or releasing the
 * tensors) leaves the parent's subscriber, producer, loan and received tensor
 * as they were, and the child can connect a client of its own. Before the
 * fix the child's closes unsubscribed the parent at the broker: its next
 * publish reached nobody. */
static void test_fork(void) {
    tb_client *c = connect_client("c-fork");
    if (!c)
        return;
    tb_producer *p = NULL;
    tb_consumer *cons = NULL;
    open_pair(c, "c/bcast", TB_POLICY_BLOCK, 8, &p, &cons);
    loan_and_publish(p, 8);
    tb_tensor *got = NULL, *loan = NULL;
    CHECK_OK(tb_recv(cons, 0, &got)); /* kept across the fork */
    size_t n = 8;
    CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &loan)); /* kept too */
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        FAIL_AT("fork: %s", strerror(errno));
        return;
    }
    if (pid == 0) {
        int bad = 0;
        void *d = NULL;
        const void *cd = NULL;
        tb_tensor *t = NULL;
        tb_producer *p2 = NULL;
        tb_consumer *c2 = NULL;
        CHILD_FORKED(tb_tensor_data(loan, &d, NULL));
        CHILD_FORKED(tb_tensor_const_data(got, &cd, NULL));
        CHILD_FORKED(tb_publish(loan, NULL));
        CHILD_FORKED(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
        CHILD_FORKED(tb_recv(cons, 0, &t));
        CHILD_FORKED(tb_recv(cons, 1000000, &t));
        CHILD_FORKED(tb_producer_open(c, "c/bcast", &p2));
        CHILD_FORKED(tb_consumer_open(c, "c/bcast", TB_POLICY_BLOCK, 8, &c2));
        CHILD_OK(tb_release(got)); /* releases nothing of the parent's */
        CHILD_OK(tb_consumer_close(cons));
        CHILD_OK(tb_producer_close(p));
        CHILD_OK(tb_client_close(c));
        /* A client of its own works. */
        tb_client *own = NULL;
        CHILD_OK(tb_client_connect(g_socket, "c-fork-child", &own));
        if (own) {
            CHILD_OK(tb_producer_open(own, "c/out", &p2));
            CHILD_OK(tb_consumer_open(own, "c/out", TB_POLICY_BLOCK, 8, &c2));
            CHILD_OK(tb_loan(p2, TB_DTYPE_U8, 1, &n, &t));
            CHILD_OK(tb_publish(t, NULL));
            CHILD_OK(tb_recv(c2, 1000000000ull, &t));
            CHILD_OK(tb_release(t));
            CHILD_OK(tb_consumer_close(c2));
            CHILD_OK(tb_producer_close(p2));
            CHILD_OK(tb_client_close(own));
        }
        fflush(stderr);
        exit(bad ? 1 : 0); /* a normal exit (valgrind checks the child too) */
    }
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);

    /* The parent's handles are intact; another client's new subscriber gets
     * every tensor (before the fix it shared the subscriber slot the child
     * closed with the parent's stale consumer). */
    tb_client *other = connect_client("c-fork-other");
    tb_consumer *fresh = NULL;
    if (other)
        CHECK_OK(tb_consumer_open(other, "c/bcast", TB_POLICY_BLOCK, 8, &fresh));
    void *d = NULL;
    CHECK_OK(tb_tensor_data(loan, &d, NULL));
    uint32_t delivered = 0;
    CHECK_OK(tb_publish(loan, &delivered));
    CHECK(delivered == (fresh ? 2u : 1u));
    for (int i = 0; i < 3; i++) {
        tb_tensor *t = NULL;
        CHECK_OK(tb_loan(p, TB_DTYPE_U8, 1, &n, &t));
        delivered = 0;
        CHECK_OK(tb_publish(t, &delivered));
        CHECK(delivered == (fresh ? 2u : 1u));
    }
    const void *cd = NULL;
    CHECK_OK(tb_tensor_const_data(got, &cd, NULL));
    CHECK_OK(tb_release(got));
    for (uint64_t seq = 1; seq <= 4; seq++) {
        tb_consumer *each[2] = {cons, fresh};
        for (int k = 0; k < 2 && each[k]; k++) {
            tb_tensor *t = NULL;
            uint64_t s = UINT64_MAX;
            CHECK_OK(tb_recv(each[k], 1000000000ull, &t));
            CHECK_OK(tb_tensor_seq(t, &s));
            CHECK(s == seq);
            CHECK_OK(tb_release(t));
        }
    }
    if (fresh) {
        tb_tensor *t = NULL;
        CHECK_ST(tb_recv(fresh, 0, &t), TB_ERR_TIMEOUT);
        CHECK_OK(tb_consumer_close(fresh));
    }
    if (other)
        CHECK_OK(tb_client_close(other));
    close_pair(c, p, cons);
}

/* --------------------------------------------------------------- main -- */

/* --------------------------------- late joiners and end of stream (14) -- */

static const char *const SMALL_POOL[] = {"small"};

/* A spec of a run-time channel of `mode` on the pool "small" keeping `history` tensors. */
static tb_channel_spec small_spec(tb_mode mode, uint32_t history) {
    tb_channel_spec spec = TB_CHANNEL_SPEC_INIT;
    spec.pools = SMALL_POOL;
    spec.npools = 1;
    spec.mode = mode;
    spec.history = history;
    return spec;
}

/* Opens a producer on `channel`, created from `spec` if it is missing. */
static tb_status open_creating(tb_client *c, const char *channel, const tb_channel_spec *spec,
                               tb_producer **p) {
    tb_producer_options o = TB_PRODUCER_OPTIONS_INIT;
    o.create = spec;
    return tb_producer_open_with(c, channel, &o, p);
}

/* Receives one tensor within `timeout_ns` and returns its first byte
 * (releasing it), or -1 with the status in `*st`. */
static int recv_byte(tb_consumer *cons, uint64_t timeout_ns, tb_status *st) {
    tb_tensor *t = (tb_tensor *)0x1;
    *st = tb_recv(cons, timeout_ns, &t);
    if (*st != TB_OK) {
        CHECK(t == NULL);
        return -1;
    }
    const void *d = NULL;
    CHECK_OK(tb_tensor_const_data(t, &d, NULL));
    int v = d ? ((const uint8_t *)d)[0] : -1;
    CHECK_OK(tb_release(t));
    return v;
}

/* Checks that the next receive (within `timeout_ns`) gives a tensor whose first byte is `want`. */
#define CHECK_RECV(cons, timeout_ns, want)                                      \
    do {                                                                        \
        tb_status st_;                                                          \
        int v_ = recv_byte((cons), (timeout_ns), &st_);                         \
        if (v_ != (want))                                                       \
            FAIL_AT("received %d (%s), expected %d (last error: %s)", v_,      \
                    tb_status_str((int)st_), (want), tb_last_error_message());  \
    } while (0)

/* A channel's history: a subscriber that joins late first receives the
 * latest N tensors, oldest first (at most its depth); a bad spec is refused. */
static void test_history_late_consumer(void) {
    tb_client *c = connect_client("c-history");
    if (!c)
        return;
    tb_channel_spec spec = small_spec(TB_MODE_BROADCAST, 2);
    tb_producer *p = NULL;
    CHECK_OK(open_creating(c, "c/hist", &spec, &p));
    for (uint8_t v = 1; v <= 3; v++)
        CHECK(publish_bytes(p, 16, v) == 0); /* no subscriber yet */
    CHECK(stat_count("c/hist", "history") == 2);
    CHECK(stat_count("c/hist", "history_held") == 2);

    tb_consumer *late = NULL, *shallow = NULL;
    CHECK_OK(tb_consumer_open(c, "c/hist", TB_POLICY_DEFAULT, 0, &late));
    CHECK_OK(tb_consumer_open(c, "c/hist", TB_POLICY_LATEST, 1, &shallow));
    CHECK_RECV(late, 0, 2);
    CHECK_RECV(late, 0, 3);
    CHECK_RECV(late, 0, -1); /* the producer is open: nothing, no end of stream */
    CHECK_RECV(shallow, 0, 3); /* depth 1: only the newest kept one */
    CHECK(publish_bytes(p, 16, 4) == 2);
    CHECK_RECV(late, 0, 4);
    CHECK_RECV(shallow, 0, 4);

    /* An existing channel is opened as it is: the create spec is ignored. */
    tb_channel_spec other = small_spec(TB_MODE_WORKQUEUE, 0);
    tb_producer *p2 = NULL;
    CHECK_OK(open_creating(c, "c/hist", &other, &p2));
    CHECK(publish_bytes(p2, 16, 5) == 2);
    CHECK_RECV(late, 0, 5);
    CHECK_RECV(shallow, 0, 5);

    /* The history outlives its producers: a consumer created later still
     * gets the latest two, then end of stream (both closed cleanly). */
    CHECK_OK(tb_producer_close(p));
    CHECK_OK(tb_producer_close(p2));
    tb_consumer *later = NULL;
    CHECK_OK(tb_consumer_open(c, "c/hist", TB_POLICY_DEFAULT, 0, &later));
    CHECK_RECV(later, 1000000000ull, 4);
    CHECK_RECV(later, 0, 5);
    tb_status st;
    CHECK(recv_byte(later, 0, &st) == -1 && st == TB_END_OF_STREAM);

    /* A consumer may create the channel too (with a history). */
    tb_channel_spec kept = small_spec(TB_MODE_BROADCAST, 1);
    tb_consumer_options co = TB_CONSUMER_OPTIONS_INIT;
    co.create = &kept;
    tb_consumer *creator = NULL;
    CHECK_OK(tb_consumer_open_with(c, "c/hist2", &co, &creator));
    CHECK(stat_count("c/hist2", "history") == 1);

    /* Bad specs. */
    tb_producer *bad = (tb_producer *)0x1;
    tb_channel_spec wq = small_spec(TB_MODE_WORKQUEUE, 1);
    CHECK_ST(open_creating(c, "c/hist-wq", &wq, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("broadcast channels only");
    CHECK(bad == NULL);
    tb_channel_spec deep = small_spec(TB_MODE_BROADCAST, 1000);
    CHECK_ST(open_creating(c, "c/hist-deep", &deep, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("ring_capacity");
    tb_channel_spec odd = small_spec(7, 0);
    CHECK_ST(open_creating(c, "c/hist-odd", &odd, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("TB_MODE_");
    tb_channel_spec nopools = small_spec(TB_MODE_BROADCAST, 0);
    nopools.pools = NULL;
    CHECK_ST(open_creating(c, "c/hist-odd", &nopools, &bad), TB_ERR_INVALID_ARGUMENT);
    const char *const unknown_pool[] = {"nope"};
    tb_channel_spec unknown = small_spec(TB_MODE_BROADCAST, 0);
    unknown.pools = unknown_pool;
    CHECK_ST(open_creating(c, "c/hist-odd", &unknown, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("nope");
    tb_channel_spec unsized = small_spec(TB_MODE_BROADCAST, 0);
    unsized.struct_size = 0;
    CHECK_ST(open_creating(c, "c/hist-odd", &unsized, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("struct_size");
    tb_producer_options po = TB_PRODUCER_OPTIONS_INIT;
    po.struct_size = 1u << 20;
    CHECK_ST(tb_producer_open_with(c, "c/hist", &po, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("struct_size");
    /* A struct from a newer header: its unknown fields must be zero. */
    struct {
        tb_channel_spec spec;
        uint64_t newer_field;
    } newer = {small_spec(TB_MODE_BROADCAST, 0), 1};
    newer.spec.struct_size = sizeof newer;
    CHECK_ST(open_creating(c, "c/hist-odd", &newer.spec, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("does not know");
    newer.newer_field = 0;
    CHECK_OK(open_creating(c, "c/hist", &newer.spec, &bad));
    CHECK_OK(tb_producer_close(bad));
    /* A struct from an older header: the fields it lacks are 0 (here: history). */
    tb_channel_spec older = small_spec(TB_MODE_BROADCAST, 5);
    older.struct_size = offsetof(tb_channel_spec, history);
    CHECK_OK(open_creating(c, "c/hist-old", &older, &bad));
    CHECK(stat_count("c/hist-old", "history") == 0);
    CHECK_OK(tb_producer_close(bad));
    /* NULL options are the defaults: the channel must exist. */
    CHECK_ST(tb_producer_open_with(c, "c/hist-none", NULL, &bad), TB_ERR_NO_CHANNEL);

    CHECK_OK(tb_consumer_close(creator));
    CHECK_OK(tb_consumer_close(later));
    CHECK_OK(tb_consumer_close(late));
    CHECK_OK(tb_consumer_close(shallow));
    CHECK_OK(tb_channel_remove(c, "c/hist"));
    CHECK_OK(tb_channel_remove(c, "c/hist2"));
    CHECK_OK(tb_channel_remove(c, "c/hist-old"));
    CHECK_OK(tb_client_close(c));
}

enum { WAIT_TENSORS = 40 };

/* A consumer thread that waits for a channel, then receives until end of stream. */
typedef struct {
    tb_client *c;
    tb_status open, last;
    int got[WAIT_TENSORS + 1];
    int n, bad;
} waiter_arg;

static void *waiter(void *arg) {
    waiter_arg *a = arg;
    tb_consumer *cons = NULL;
    a->open = tb_consumer_open_wait(a->c, "c/late", TB_POLICY_BLOCK, 8, TB_TIMEOUT_INFINITE, &cons);
    if (a->open != TB_OK)
        return NULL;
    for (;;) {
        tb_status st;
        int v = recv_byte(cons, TB_TIMEOUT_INFINITE, &st);
        if (st != TB_OK) {
            a->last = st;
            break;
        }
        if (a->n <= WAIT_TENSORS)
            a->got[a->n++] = v;
    }
    if (tb_consumer_close(cons) != TB_OK)
        a->bad++;
    return NULL;
}

/* A consumer started before the channel exists waits for it and gets every
 * tensor from the first on; the stream ends when the producer closes. */
static void test_wait_for_channel(void) {
    tb_client *c = connect_client("c-wait");
    if (!c)
        return;
    waiter_arg a = {.c = c, .open = TB_ERR_INTERNAL, .last = TB_OK};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, waiter, &a) == 0);
    /* Until its subscription is registered (stat shows the waiting channel). */
    while (stat_count("c/late", "subscribers") < 1)
        usleep(2000);
    CHECK(stat_count("c/late", "pending") == 1);
    /* For a producer without create options the channel does not exist. */
    tb_producer *p = NULL;
    CHECK_ST(tb_producer_open(c, "c/late", &p), TB_ERR_NO_CHANNEL);
    tb_channel_spec spec = small_spec(TB_MODE_BROADCAST, 0);
    CHECK_OK(open_creating(c, "c/late", &spec, &p));
    /* No wait for subscribers: the first publish already reaches the waiter. */
    for (int v = 0; v < WAIT_TENSORS; v++)
        CHECK(publish_bytes(p, 16, (uint8_t)v) == 1);
    CHECK_OK(tb_producer_close(p));
    CHECK(pthread_join(th, NULL) == 0);
    CHECK_ST(a.open, TB_OK);
    CHECK_ST(a.last, TB_END_OF_STREAM);
    CHECK(a.bad == 0);
    CHECK(a.n == WAIT_TENSORS);
    int in_order = a.n == WAIT_TENSORS;
    for (int i = 0; in_order && i < a.n; i++)
        in_order = a.got[i] == i;
    CHECK(in_order);
    CHECK_OK(tb_channel_remove(c, "c/late"));
    CHECK_OK(tb_client_close(c));
}

/* A wait that times out fails with TB_ERR_TIMEOUT and leaves nothing open. */
static void test_wait_timeout(void) {
    tb_client *c = connect_client("c-wait");
    if (!c)
        return;
    tb_consumer *cons = (tb_consumer *)0x1;
    uint64_t start = now_ns();
    CHECK_ST(tb_consumer_open_wait(c, "c/never", TB_POLICY_DEFAULT, 0, 50000000ull, &cons),
             TB_ERR_TIMEOUT);
    CHECK(now_ns() - start >= 50000000ull);
    CHECK(cons == NULL);
    CHECK_MSG("did not appear");
    /* 0: no wait at all. */
    CHECK_ST(tb_consumer_open_wait(c, "c/never", TB_POLICY_DEFAULT, 0, 0, &cons),
             TB_ERR_NO_CHANNEL);
    /* The same through the options struct, for a consumer and a stage. */
    tb_consumer_options o = TB_CONSUMER_OPTIONS_INIT;
    o.wait_channel_ns = 10000000ull;
    CHECK_ST(tb_consumer_open_with(c, "c/never", &o, &cons), TB_ERR_TIMEOUT);
    CHECK(cons == NULL);
    tb_stage *g = (tb_stage *)0x1;
    CHECK_ST(tb_stage_open_with(c, "c/never", "c/out", &o, &g), TB_ERR_TIMEOUT);
    CHECK(g == NULL);
    /* Bad options change nothing. */
    o.flags = 0x80;
    CHECK_ST(tb_consumer_open_with(c, "c/bcast", &o, &cons), TB_ERR_INVALID_ARGUMENT);
    CHECK_MSG("flags");
    o.flags = 0;
    o.reserved = 1;
    CHECK_ST(tb_consumer_open_with(c, "c/bcast", &o, &cons), TB_ERR_INVALID_ARGUMENT);
    o.reserved = 0;
    o.policy = 42;
    CHECK_ST(tb_consumer_open_with(c, "c/bcast", &o, &cons), TB_ERR_INVALID_ARGUMENT);
    o.policy = TB_POLICY_DEFAULT;
    o.struct_size = 0;
    CHECK_ST(tb_consumer_open_with(c, "c/bcast", &o, &cons), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_consumer_open_wait(c, NULL, 0, 0, 0, &cons), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_consumer_open_wait(c, "c/bcast", 0, 0, 0, NULL), TB_ERR_INVALID_ARGUMENT);
    /* The waiting subscriptions are gone (the broker frees a pending
     * channel once its last waiter left). */
    while (stat_count("c/never", "pending") != -1)
        usleep(2000);
    CHECK_ST(tb_channel_remove(c, "c/never"), TB_ERR_NO_CHANNEL);
    CHECK_OK(tb_client_close(c)); /* no handle was left open */
}

/* One blocking receive in another thread. */
typedef struct {
    tb_consumer *cons;
    tb_status st;
} blocked_recv;

static void *recv_forever(void *arg) {
    blocked_recv *b = arg;
    (void)recv_byte(b->cons, TB_TIMEOUT_INFINITE, &b->st);
    return NULL;
}

/* End of stream: after the last producer's clean close, once the queue is
 * drained (and only then); opt-out per consumer; a new producer resumes. */
static void test_end_of_stream(void) {
    tb_client *c = connect_client("c-eos");
    if (!c)
        return;
    tb_channel_spec spec = small_spec(TB_MODE_BROADCAST, 0);
    tb_producer *a = NULL, *b = NULL;
    CHECK_OK(open_creating(c, "c/eos", &spec, &a));
    tb_consumer *cons = NULL, *service = NULL;
    CHECK_OK(tb_consumer_open(c, "c/eos", TB_POLICY_BLOCK, 8, &cons));
    tb_consumer_options o = TB_CONSUMER_OPTIONS_INIT;
    o.flags = TB_CONSUMER_NO_END_OF_STREAM;
    CHECK_OK(tb_consumer_open_with(c, "c/eos", &o, &service));
    CHECK_RECV(cons, 0, -1);
    CHECK_OK(tb_producer_open(c, "c/eos", &b));
    CHECK(publish_bytes(a, 16, 1) == 2);
    CHECK_OK(tb_producer_close(a));
    /* One producer left: no end of stream. */
    CHECK_RECV(cons, 0, 1);
    tb_status st;
    CHECK(recv_byte(cons, 10000000ull, &st) == -1 && st == TB_ERR_TIMEOUT);
    CHECK(publish_bytes(b, 16, 2) == 2);
    CHECK(publish_bytes(b, 16, 3) == 2);
    CHECK_OK(tb_producer_close(b));
    /* Queued tensors first, then end of stream from every kind of receive. */
    CHECK_RECV(cons, TB_TIMEOUT_INFINITE, 2);
    CHECK_RECV(cons, 0, 3);
    tb_tensor *t = (tb_tensor *)0x1;
    CHECK_ST(tb_recv(cons, TB_TIMEOUT_INFINITE, &t), TB_END_OF_STREAM);
    CHECK(t == NULL);
    CHECK_MSG("end of stream");
    CHECK_ST(tb_recv(cons, 0, &t), TB_END_OF_STREAM);
    CHECK_ST(tb_recv(cons, 1000000000ull, &t), TB_END_OF_STREAM);
    CHECK(strcmp(tb_status_str(TB_END_OF_STREAM), "TB_END_OF_STREAM") == 0);
    CHECK(stat_count("c/eos", "ended") == 1);
    /* The opted-out consumer drains, then just times out. */
    CHECK_RECV(service, 0, 1);
    CHECK_RECV(service, 0, 2);
    CHECK_RECV(service, 0, 3);
    CHECK(recv_byte(service, 10000000ull, &st) == -1 && st == TB_ERR_TIMEOUT);
    CHECK(recv_byte(service, 0, &st) == -1 && st == TB_ERR_TIMEOUT);
    /* A new producer starts a new stream. */
    CHECK_OK(tb_producer_open(c, "c/eos", &a));
    CHECK_RECV(cons, 0, -1);
    CHECK(publish_bytes(a, 16, 4) == 2);
    CHECK_RECV(cons, 0, 4);
    CHECK_RECV(service, 0, 4);
    /* A receive blocked in another thread wakes at end of stream. */
    blocked_recv blocked = {cons, TB_OK};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, recv_forever, &blocked) == 0);
    CHECK_OK(tb_producer_close(a));
    CHECK(pthread_join(th, NULL) == 0);
    CHECK_ST(blocked.st, TB_END_OF_STREAM);
    CHECK_OK(tb_consumer_close(cons));
    CHECK_OK(tb_consumer_close(service));
    CHECK_OK(tb_channel_remove(c, "c/eos"));
    CHECK_OK(tb_client_close(c));
}

/* A stage sees end of stream on its input, and its close ends its output's stream. */
static void test_stage_end_of_stream(void) {
    tb_client *c = connect_client("c-stage-eos");
    if (!c)
        return;
    /* The output is created by its consumer, the input by the stage. */
    tb_channel_spec out_spec = small_spec(TB_MODE_BROADCAST, 0);
    tb_channel_spec in_spec = small_spec(TB_MODE_WORKQUEUE, 0);
    tb_consumer_options co = TB_CONSUMER_OPTIONS_INIT;
    co.create = &out_spec;
    tb_consumer *sink = NULL;
    CHECK_OK(tb_consumer_open_with(c, "c/eos-out", &co, &sink));
    tb_consumer_options so = TB_CONSUMER_OPTIONS_INIT;
    so.create = &in_spec;
    tb_stage *g = NULL, *keeps_waiting = NULL;
    CHECK_OK(tb_stage_open_with(c, "c/eos-in", "c/eos-out", &so, &g));
    tb_stage *bad = (tb_stage *)0x1;
    CHECK_ST(tb_stage_open_with(c, "c/bcast", "c/eos-out", NULL, &bad), TB_ERR_INVALID_ARGUMENT);
    CHECK(bad == NULL);
    tb_producer *camera = NULL;
    CHECK_OK(tb_producer_open(c, "c/eos-in", &camera));
    for (uint8_t v = 0; v < 5; v++)
        CHECK(publish_bytes(camera, 16, v) == 1);
    CHECK_OK(tb_producer_close(camera));
    /* A worker that opts out, opened after the stream ended, keeps waiting. */
    so.create = NULL;
    so.flags = TB_CONSUMER_NO_END_OF_STREAM;
    CHECK_OK(tb_stage_open_with(c, "c/eos-in", "c/eos-out", &so, &keeps_waiting));
    int n = 0;
    tb_status st;
    for (;;) {
        tb_tensor *t = NULL;
        st = tb_recv_mut(g, TB_TIMEOUT_INFINITE, &t);
        if (st != TB_OK)
            break;
        void *d = NULL;
        CHECK_OK(tb_tensor_data(t, &d, NULL));
        if (d)
            ((uint8_t *)d)[0] += 100;
        CHECK_OK(tb_forward(t, NULL));
        n++;
    }
    CHECK_ST(st, TB_END_OF_STREAM);
    CHECK(n == 5);
    tb_tensor *t = (tb_tensor *)0x1;
    CHECK_ST(tb_recv_mut(g, 0, &t), TB_END_OF_STREAM);
    CHECK(t == NULL);
    CHECK_ST(tb_recv_mut(keeps_waiting, 10000000ull, &t), TB_ERR_TIMEOUT);
    CHECK_OK(tb_stage_close(keeps_waiting));
    /* The sink: the stage's output, still open, has not ended... */
    for (int v = 100; v < 105; v++)
        CHECK_RECV(sink, TB_TIMEOUT_INFINITE, v);
    CHECK(recv_byte(sink, 0, &st) == -1 && st == TB_ERR_TIMEOUT);
    /* ...until the stage (its last producer) closes. */
    CHECK_OK(tb_stage_close(g));
    CHECK(recv_byte(sink, TB_TIMEOUT_INFINITE, &st) == -1 && st == TB_END_OF_STREAM);
    CHECK_OK(tb_consumer_close(sink));
    CHECK_OK(tb_channel_remove(c, "c/eos-in"));
    CHECK_OK(tb_channel_remove(c, "c/eos-out"));
    CHECK_OK(tb_client_close(c));
}

/* tb_channel_remove: refused while in use and for declared channels;
 * a removed channel is gone (its history released) and may be created again. */
static void test_channel_remove(void) {
    tb_client *c = connect_client("c-remove");
    if (!c)
        return;
    long free_before = stat_count("small", "slots_free");
    tb_channel_spec spec = small_spec(TB_MODE_BROADCAST, 2);
    tb_producer *p = NULL;
    CHECK_OK(open_creating(c, "c/tmp", &spec, &p));
    publish_bytes(p, 16, 1);
    publish_bytes(p, 16, 2);
    CHECK(stat_count("small", "slots_free") == free_before - 2); /* the history holds two */
    CHECK_ST(tb_channel_remove(c, "c/tmp"), TB_ERR_BUSY);
    CHECK_MSG("in use");
    CHECK_OK(tb_producer_close(p));
    tb_consumer *cons = NULL;
    CHECK_OK(tb_consumer_open(c, "c/tmp", TB_POLICY_DEFAULT, 0, &cons));
    CHECK_ST(tb_channel_remove(c, "c/tmp"), TB_ERR_BUSY);
    CHECK_OK(tb_consumer_close(cons));
    CHECK_OK(tb_channel_remove(c, "c/tmp"));
    CHECK(stat_count("c/tmp", "history") == -1);
    CHECK(stat_count("small", "slots_free") == free_before); /* released */
    CHECK_ST(tb_channel_remove(c, "c/tmp"), TB_ERR_NO_CHANNEL);
    CHECK_MSG("c/bcast"); /* the message lists the known channels */
    CHECK_ST(tb_channel_remove(c, "c/bcast"), TB_ERR_PERMISSION_DENIED);
    CHECK_MSG("declared in the broker config");
    CHECK_ST(tb_channel_remove(c, NULL), TB_ERR_INVALID_ARGUMENT);
    CHECK_ST(tb_channel_remove(NULL, "c/tmp"), TB_ERR_INVALID_ARGUMENT);
    /* Created again, fresh (no history left, no stream ended). */
    CHECK_OK(open_creating(c, "c/tmp", &spec, &p));
    CHECK_OK(tb_consumer_open(c, "c/tmp", TB_POLICY_DEFAULT, 0, &cons));
    CHECK_RECV(cons, 0, -1);
    CHECK(publish_bytes(p, 16, 9) == 1);
    CHECK_RECV(cons, 0, 9);
    CHECK_OK(tb_consumer_close(cons));
    CHECK_OK(tb_producer_close(p));
    CHECK_OK(tb_channel_remove(c, "c/tmp"));
    CHECK_OK(tb_client_close(c));
}

typedef struct {
    const char *name;
    void (*fn)(void);
} test_case;

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s TENSORBUS_BIN TB_PEER_BIN BROKER_CONFIG\n", argv[0]);
        return 2;
    }
    alarm(600); /* a hung test fails instead of hanging CI */
    signal(SIGPIPE, SIG_IGN);
    g_tensorbus = argv[1];
    g_peer = argv[2];

    char dir[] = "/tmp/tb-ctest-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    static char sock[64];
    snprintf(sock, sizeof sock, "%s/broker.sock", dir);
    g_socket = sock;
    char *bargv[] = {argv[1], "broker", "--config", argv[3], "--socket", sock, NULL};
    child broker;
    if (spawn(bargv, &broker, 0) != 0) {
        perror("spawn broker");
        return 2;
    }
    int up = 0;
    for (int i = 0; i < 200 && !up; i++) {
        tb_client *c = NULL;
        if (tb_client_connect(sock, "probe", &c) == TB_OK) {
            tb_client_close(c);
            up = 1;
        } else {
            usleep(50000);
        }
    }
    if (!up) {
        fprintf(stderr, "broker did not come up at %s: %s\n", sock, tb_last_error_message());
        kill(broker.pid, SIGKILL);
        finish_child(&broker);
        return 2;
    }

    const test_case tests[] = {
        {"connect_and_open_errors", test_connect_and_open_errors},
        {"publish_and_receive", test_publish_and_receive},
        {"timeouts", test_timeouts},
        {"pool_exhausted_and_too_large", test_pool_exhausted_and_too_large},
        {"stage_in_place", test_stage_in_place},
        {"stage_into_own_input", test_stage_into_own_input},
        {"misuse", test_misuse},
        {"close_with_live_tensors", test_close_with_live_tensors},
        {"threads", test_threads},
        {"many_tensors", test_many_tensors},
        {"dropped_counter", test_dropped_counter},
        {"c_producer_rust_consumer", test_c_producer_rust_consumer},
        {"rust_producer_c_consumer", test_rust_producer_c_consumer},
        {"fork", test_fork},
        {"history_late_consumer", test_history_late_consumer},
        {"wait_for_channel", test_wait_for_channel},
        {"wait_timeout", test_wait_timeout},
        {"end_of_stream", test_end_of_stream},
        {"stage_end_of_stream", test_stage_end_of_stream},
        {"channel_remove", test_channel_remove},
    };
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        int before = g_failed_checks;
        tests[i].fn();
        if (g_failed_checks == before) {
            passed++;
            printf("ok     %s\n", tests[i].name);
        } else {
            failed++;
            printf("FAILED %s\n", tests[i].name);
        }
        fflush(stdout);
    }

    kill(broker.pid, SIGTERM);
    finish_child(&broker);
    unlink(sock);
    rmdir(dir);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
