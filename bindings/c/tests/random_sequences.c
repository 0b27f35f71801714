/*
 * Seeded random sequences of C API calls checked against a model (issue 11,
 * "Tests that find this class of defect").
 *
 *     random_sequences TENSORBUS_BIN BROKER_CONFIG
 *
 * Starts `tensorbus broker` with BROKER_CONFIG (tests/random.toml) on a
 * temporary socket, then runs the regression seeds and one more seed from
 * $TENSORBUS_RANDOM_SEED (else the clock), $TENSORBUS_RANDOM_CALLS calls
 * each (default 3000). The seed is printed first; rerun a failure with
 *     TENSORBUS_RANDOM_SEED=N make -C bindings/c test
 * (with $TENSORBUS_RANDOM_SEED set only that seed runs).
 *
 * Clients, producers, consumers (every policy, small depths) and stages
 * (into another work queue, a broadcast channel, their own input, loops of
 * two stages, a channel of another pool) are opened and closed at random;
 * loans (up to MAXLOANS per producer), received tensors and staged tensors
 * (up to MAXSTAGED per stage) are held across steps and published,
 * forwarded or released later, also after the handle they came from was
 * closed (closing never waits for them: tensors outlive their handle);
 * hostile calls (NULL, closed, released and wrong-kind handles, double
 * release, tb_publish on a received or staged tensor, tb_forward on a loan,
 * closing clients with open handles, bad dtypes and shapes, unknown
 * channels and bad names) are mixed in. Every payload carries a unique id
 * (a u32 in its first four bytes). The model says what each call must
 * return:
 *
 *  - every status is a documented tb_status, and the expected one;
 *  - broadcast: each subscriber's queue from each writer is modelled
 *    exactly (one thread drives everything and a publish pushes before it
 *    returns): tb_recv returns the front of one of them, or, iff all are
 *    empty, TB_END_OF_STREAM when the channel's stream has ended (below)
 *    and the consumer reports it, else TB_ERR_TIMEOUT; tb_consumer_dropped
 *    matches;
 *  - end of stream: a channel's stream has ended once the last of its
 *    producers closed (a producer's broker handle closes with the producer
 *    or, when loans outlive it, with its last loan; a stage is a producer
 *    of its output while it or one of its staged tensors lives), until a
 *    producer opens again; the state is kept across seeds, as the broker
 *    keeps it. Consumers and stages are opened with tb_consumer_open,
 *    tb_consumer_open_wait, tb_consumer_open_with (some with
 *    TB_CONSUMER_NO_END_OF_STREAM, which never see it) and
 *    tb_stage_open_with. On a work queue whose stream has ended a receive
 *    of a consumer that reports it returns a tensor or TB_END_OF_STREAM,
 *    never TB_ERR_TIMEOUT; before, never TB_END_OF_STREAM;
 *  - work queue: a tensor is received by at most one worker and, unless a
 *    lossy worker could have taken it or its last worker left, exactly once
 *    by the end (after a final drain with timeouts: the broker redispatches
 *    a closed worker's entries asynchronously);
 *  - a closed consumer or stage gets nothing more at once (its queue is
 *    dropped from the model when it closes: a later delivery to it would
 *    show as a wrong `delivered` count or a block publish that hangs), and
 *    its tensors, like a closed producer's loans, still carry their ids;
 *  - no loan succeeds while the model knows every slot of its pool is held
 *    (a lost hold would free a queued slot), and once every client is
 *    closed a fresh client can loan every slot of every pool (from one
 *    producer: loans are not limited to one at a time).
 *
 * A publish that waits for room on a full `block` subscriber would hang the
 * single thread, so the model publishes only where it knows there is room
 * (exactly for broadcast; for a work queue while the writer has fewer
 * outstanding entries than the workers' depths add up to); otherwise the
 * loan is released.
 */
#define _GNU_SOURCE
#include "tensorbus.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Seeds that always run first. 1 and 2 find issue 11.1 (a stage forwarding
 * into its own input) within a few hundred calls when its fix is reverted
 * (tb_recv_mut: TB_ERR_CORRUPTED "slot is not held by this subscriber").
 * Add a seed here once the defect it found is fixed. */
static const uint64_t REGRESSION_SEEDS[] = {1, 2};

#define NCH 5
static const char *CH[NCH] = {"r/b1", "r/b2", "r/w1", "r/w2", "r/q"};
static const int CH_POOL[NCH] = {0, 0, 0, 0, 1}; /* r/q uses the other pool */
#define NPOOL 2
static const int POOL_SLOTS[NPOOL] = {12, 3};
#define RING 8     /* limits.ring_capacity */
#define WQ_DEPTH 4 /* the channels' default depth (a stage's input depth) */

#define MAXC 3
#define MAXP 6
#define MAXS 8
#define MAXST 3
#define MAXW (MAXP + MAXST)
#define MAXHELD 4
#define MAXLOANS 3  /* loans one producer holds at once */
#define MAXSTAGED 3 /* tensors one stage holds at once */
#define NSTALE 64
#define STALE_WINDOW 256 /* the registry remembers the last 1024 retired handles */

static int is_wq(int ch) { return ch == 2 || ch == 3; }

/* ------------------------------------------------------------ the world -- */

typedef struct {
    int pool;
    int wq;      /* queued on this work-queue channel, -1: not */
    int must;    /* it must arrive (see the header comment) */
    int queued;  /* entries in broadcast subscribers' queues */
    int held;    /* received handles holding it */
    int loaned;  /* a producer's loan */
    int staged;  /* a stage holds it */
    int writer;  /* who queued it on a work queue, and that writer's generation */
    unsigned gen;
} item;

typedef struct {
    tb_client *h;
    int open;
} client_m;

/* A producer, consumer or stage slot is in use while its handle is open or
 * tensors from it are alive (`live`); it is reused only after both. */
typedef struct {
    tb_producer *h;
    int open, client, ch;
    tb_tensor *loan[MAXLOANS];
    uint32_t loan_id[MAXLOANS];
    int nloans;
} prod_m;

typedef struct {
    tb_consumer *h;
    int open, client, ch, policy, depth;
    int eos; /* reports end of stream (not TB_CONSUMER_NO_END_OF_STREAM) */
    uint32_t rows[MAXW][RING];
    int rowlen[MAXW];
    uint64_t dropped;
    tb_tensor *held[MAXHELD];
    uint32_t held_id[MAXHELD];
    int nheld;
} cons_m;

typedef struct {
    tb_stage *h;
    int open, client, in, out;
    int eos; /* its input reports end of stream */
    tb_tensor *t[MAXSTAGED];
    uint32_t t_id[MAXSTAGED];
    int nt;
} stage_m;

typedef struct {
    void *p;
    int kind; /* 0 client, 1 producer, 2 consumer, 3 stage, 4 tensor */
    uint64_t when;
} stale_m;

enum { N_PUB_B, N_PUB_W, N_RECV_B, N_RECV_W, N_EMPTY, N_FWD, N_FWD_SELF, N_STAGE_REL, N_HOSTILE, N_STALE,
       N_BUSY, N_EXHAUSTED, N_LIMIT, N_CLOSE_LIVE, N_AFTER_CLOSE, N_MORE, N_EOS, N_COUNTS };
static const char *COUNT_NAMES[N_COUNTS] = {
    "publish broadcast", "publish wq", "recv broadcast", "recv wq", "recv empty", "forward",
    "forward own input", "stage release", "hostile", "stale handle", "busy client", "pool exhausted",
    "limit reached", "close with live tensors", "tensor used after its handle closed",
    "second loan or staged tensor", "end of stream"};

static struct {
    uint64_t seed, rng;
    long step;
    const char *socket;
    client_m c[MAXC];
    prod_m p[MAXP];
    cons_m s[MAXS];
    stage_m st[MAXST];
    item *items;
    uint32_t nitems, next_id;
    int wq_out[MAXW];
    unsigned wgen[MAXW];
    stale_m stale[NSTALE];
    int nstale;
    uint64_t retired;
    int nprod[NCH]; /* live producers per channel at the last sync_ended */
    char trace[24][160];
    int ntrace;
    long counts[N_COUNTS];
} W;

static pid_t g_broker; /* stopped on failure too */

/* Whether each channel's stream has ended (see the header comment): the
 * broker keeps it across seeds, so the model does too. */
static int g_ended[NCH];

static void note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(W.trace[W.ntrace % 24], sizeof W.trace[0], fmt, ap);
    va_end(ap);
    W.ntrace++;
}

static void fail(const char *fmt, ...) {
    fprintf(stderr, "random_sequences: seed %llu step %ld: ",
            (unsigned long long)W.seed, W.step);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n  last error: %s\n  last calls:\n", tb_last_error_message());
    int first = W.ntrace > 24 ? W.ntrace - 24 : 0;
    for (int i = first; i < W.ntrace; i++)
        fprintf(stderr, "    %s\n", W.trace[i % 24]);
    fprintf(stderr, "rerun: TENSORBUS_RANDOM_SEED=%llu make -C bindings/c test\n",
            (unsigned long long)W.seed);
    if (g_broker > 0)
        kill(g_broker, SIGTERM);
    exit(1);
}

/* splitmix64 */
static uint64_t rnd(void) {
    W.rng += 0x9e3779b97f4a7c15ull;
    uint64_t z = W.rng;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int below(int n) { return (int)(rnd() % (uint64_t)n); }
static int chance(int percent) { return (int)(rnd() % 100) < percent; }

/* Checks that `s` is the status the model expects (`want`, or `alt` when >= 0). */
static void expect(tb_status s, tb_status want, int alt, const char *what) {
    if ((int)s < 0 || (int)s > TB_END_OF_STREAM)
        fail("%s returned %d, which is no documented tb_status", what, (int)s);
    if (s != want && (int)s != alt)
        fail("%s returned %s, expected %s", what, tb_status_str((int)s), tb_status_str((int)want));
}

static item *it(uint32_t id) {
    if (id == 0 || id >= W.nitems)
        fail("id %u out of range", id);
    return &W.items[id];
}

static int item_held(const item *x) {
    return x->loaned || x->staged || x->held > 0 || x->queued > 0 || (x->wq >= 0 && x->must);
}

static int held_in_pool(int pool) {
    int n = 0;
    for (uint32_t id = 1; id <= W.next_id; id++)
        if (W.items[id].pool == pool && item_held(&W.items[id]))
            n++;
    return n;
}

static void retire(void *p, int kind) {
    W.retired++;
    W.stale[W.nstale % NSTALE] = (stale_m){p, kind, W.retired};
    W.nstale++;
}

static int prod_live(int i) { return W.p[i].open || W.p[i].nloans > 0; }
static int cons_live(int i) { return W.s[i].open || W.s[i].nheld > 0; }
static int stage_live(int i) { return W.st[i].open || W.st[i].nt > 0; }

/* Brings g_ended up to date: a channel whose live producers (producers
 * with an open handle or a live loan, stages that are open or hold staged
 * tensors, writing to it) went from some to none has ended; one with a
 * live producer has not. Called after every step and before every receive
 * (no step opens a producer and closes the last one). */
static void sync_ended(void) {
    for (int ch = 0; ch < NCH; ch++) {
        int n = 0;
        for (int i = 0; i < MAXP; i++)
            n += prod_live(i) && W.p[i].ch == ch;
        for (int i = 0; i < MAXST; i++)
            n += stage_live(i) && W.st[i].out == ch;
        if (n > 0)
            g_ended[ch] = 0;
        else if (W.nprod[ch] > 0)
            g_ended[ch] = 1;
        W.nprod[ch] = n;
    }
}

/* A random index below `n` for which `ok` holds, or -1. */
static int pick_if(int n, int (*ok)(int)) {
    int idx[16], k = 0;
    for (int i = 0; i < n; i++)
        if (ok(i))
            idx[k++] = i;
    return k ? idx[below(k)] : -1;
}

static uint32_t payload_id(const tb_tensor *t) {
    const void *d = NULL;
    size_t n = 0;
    expect(tb_tensor_const_data(t, &d, &n), TB_OK, -1, "tb_tensor_const_data");
    if (!d || n < 4)
        fail("tensor of %zu bytes has no id", n);
    uint32_t id;
    memcpy(&id, d, 4);
    return id;
}

/* ---------------------------------------------------------------- model -- */

/* Work-queue workers of `ch`: their number, summed depth and whether any is lossy. */
static void workers(int ch, int *n, int *depth, int *lossy) {
    *n = 0, *depth = 0, *lossy = 0;
    for (int i = 0; i < MAXS; i++)
        if (W.s[i].open && W.s[i].ch == ch) {
            (*n)++;
            *depth += W.s[i].depth;
            *lossy |= W.s[i].policy != TB_POLICY_BLOCK;
        }
    for (int i = 0; i < MAXST; i++)
        if (W.st[i].open && W.st[i].in == ch) {
            (*n)++;
            *depth += WQ_DEPTH;
        }
}

/* Whether a publish by `writer` on `ch` cannot wait for room. */
static int room(int writer, int ch) {
    if (is_wq(ch)) {
        int n, depth, lossy;
        workers(ch, &n, &depth, &lossy);
        return n == 0 || W.wq_out[writer] < depth;
    }
    for (int i = 0; i < MAXS; i++) {
        cons_m *c = &W.s[i];
        if (c->open && c->ch == ch && c->policy == TB_POLICY_BLOCK && c->rowlen[writer] >= c->depth)
            return 0;
    }
    return 1;
}

/* A writer slot may be reused once no subscriber has entries from it. */
static int writer_clean(int writer) {
    for (int i = 0; i < MAXS; i++)
        if (W.s[i].open && W.s[i].rowlen[writer] > 0)
            return 0;
    return 1;
}

/* The model's side of a publish of `id` by `writer` on `ch` that the
 * library says reached `delivered` subscribers. */
static void published(uint32_t id, int writer, int ch, uint32_t delivered) {
    item *x = it(id);
    if (is_wq(ch)) {
        int n, depth, lossy;
        workers(ch, &n, &depth, &lossy);
        if (n == 0 && delivered != 0)
            fail("publish of %u on %s with no worker delivered %u", id, CH[ch], delivered);
        if (n > 0 && !lossy && delivered != 1)
            fail("publish of %u on %s to block workers delivered %u", id, CH[ch], delivered);
        if (delivered == 1) {
            x->wq = ch;
            x->must = !lossy;
            x->writer = writer;
            x->gen = W.wgen[writer];
            W.wq_out[writer]++;
        }
        W.counts[N_PUB_W]++;
        return;
    }
    uint32_t want = 0;
    for (int i = 0; i < MAXS; i++) {
        cons_m *c = &W.s[i];
        if (!c->open || c->ch != ch)
            continue;
        int *len = &c->rowlen[writer];
        if (*len < c->depth) {
            c->rows[writer][(*len)++] = id;
        } else if (c->policy == TB_POLICY_BLOCK) {
            fail("model error: publish on a full block queue");
        } else if (c->policy == TB_POLICY_DROP_NEWEST) {
            c->dropped++;
            continue;
        } else { /* drop_oldest, latest: the oldest goes */
            it(c->rows[writer][0])->queued--;
            memmove(&c->rows[writer][0], &c->rows[writer][1], (size_t)(*len - 1) * sizeof(uint32_t));
            c->rows[writer][*len - 1] = id;
            c->dropped++;
        }
        x->queued++;
        want++;
    }
    if (delivered != want)
        fail("publish of %u on %s delivered %u, the model says %u", id, CH[ch], delivered, want);
    W.counts[N_PUB_B]++;
}

/* The model's side of `id` received on `ch` by consumer `ci` (-1: a stage). */
static void received(uint32_t id, int ch, int ci) {
    item *x = it(id);
    if (is_wq(ch)) {
        if (x->wq != ch)
            fail("received %u on %s, but the model has it %s%s", id, CH[ch],
                 x->wq < 0 ? "nowhere (unknown or received before)" : "on ",
                 x->wq < 0 ? "" : CH[x->wq]);
        x->wq = -1;
        if (W.wgen[x->writer] == x->gen)
            W.wq_out[x->writer]--;
        W.counts[N_RECV_W]++;
        return;
    }
    cons_m *c = &W.s[ci];
    for (int w = 0; w < MAXW; w++)
        if (c->rowlen[w] > 0 && c->rows[w][0] == id) {
            memmove(&c->rows[w][0], &c->rows[w][1], (size_t)(c->rowlen[w] - 1) * sizeof(uint32_t));
            c->rowlen[w]--;
            x->queued--;
            W.counts[N_RECV_B]++;
            return;
        }
    char q[256] = "";
    for (int w = 0; w < MAXW; w++)
        for (int k = 0; k < c->rowlen[w]; k++) {
            char one[24];
            snprintf(one, sizeof one, " w%d:%u", w, c->rows[w][k]);
            if (strlen(q) + strlen(one) < sizeof q)
                strcat(q, one);
        }
    fail("consumer %d (policy %u depth %d) on %s received %u; the model queues [%s ]", ci,
         (unsigned)c->policy, c->depth, CH[ch], id, q);
}

/* A worker of `ch` left: with none left, its queued items may be gone. */
static void worker_gone(int ch) {
    int n, depth, lossy;
    workers(ch, &n, &depth, &lossy);
    if (is_wq(ch) && n == 0)
        for (uint32_t id = 1; id <= W.next_id; id++)
            if (W.items[id].wq == ch)
                W.items[id].must = 0;
}

/* ------------------------------------------------------------- actions -- */

static int pick(const int *open, int n, size_t stride) {
    int idx[16], k = 0;
    for (int i = 0; i < n; i++)
        if (*(const int *)((const char *)open + (size_t)i * stride))
            idx[k++] = i;
    return k ? idx[below(k)] : -1;
}
#define PICK(arr, n) pick(&(arr)[0].open, (n), sizeof (arr)[0])

static void open_client(void) {
    for (int i = 0; i < MAXC; i++)
        if (!W.c[i].open) {
            note("connect client %d", i);
            tb_client *h = (tb_client *)0x1;
            expect(tb_client_connect(W.socket, "rnd-c", &h), TB_OK, -1, "tb_client_connect");
            W.c[i] = (client_m){h, 1};
            return;
        }
}

static int children(int k) {
    int n = 0;
    for (int i = 0; i < MAXP; i++)
        n += W.p[i].open && W.p[i].client == k;
    for (int i = 0; i < MAXS; i++)
        n += W.s[i].open && W.s[i].client == k;
    for (int i = 0; i < MAXST; i++)
        n += W.st[i].open && W.st[i].client == k;
    return n;
}

static void release_tensor(tb_tensor *t, const char *what) {
    expect(tb_release(t), TB_OK, -1, what);
    retire(t, 4);
}

/* Closes producer `i`; its loans stay (published or released later). */
static void close_producer_i(int i) {
    prod_m *p = &W.p[i];
    expect(tb_producer_close(p->h), TB_OK, -1, "tb_producer_close");
    W.counts[N_CLOSE_LIVE] += p->nloans > 0;
    retire(p->h, 1);
    p->open = 0;
}

/* Checks that a tensor of a closed handle still carries its id. */
static void still_valid(const tb_tensor *t, uint32_t id, int open, const char *what) {
    if (open)
        return;
    if (payload_id(t) != id)
        fail("%s of a closed handle carries id %u, not %u", what, payload_id(t), id);
    W.counts[N_AFTER_CLOSE]++;
}

static void release_held(cons_m *c, int k) {
    still_valid(c->held[k], c->held_id[k], c->open, "received tensor");
    release_tensor(c->held[k], "tb_release of a received tensor");
    it(c->held_id[k])->held--;
    c->held[k] = c->held[c->nheld - 1];
    c->held_id[k] = c->held_id[c->nheld - 1];
    c->nheld--;
}

static int recv_one(int i, uint64_t timeout_ns);

/* Closes consumer `i` (after receiving its whole queue if `drain`); the
 * tensors it holds stay (released later). */
static void close_consumer_i(int i, int drain) {
    cons_m *c = &W.s[i];
    if (drain && c->nheld < MAXHELD) {
        /* A broadcast subscriber must get exactly its queue. */
        while (recv_one(i, 0))
            release_held(c, c->nheld - 1);
    }
    expect(tb_consumer_close(c->h), TB_OK, -1, "tb_consumer_close");
    W.counts[N_CLOSE_LIVE] += c->nheld > 0;
    retire(c->h, 2);
    c->open = 0;
    for (int w = 0; w < MAXW; w++) {
        for (int k = 0; k < c->rowlen[w]; k++)
            it(c->rows[w][k])->queued--;
        c->rowlen[w] = 0;
    }
    worker_gone(c->ch);
}

/* Closes stage `i`; its staged tensors stay (forwarded or released later). */
static void close_stage_i(int i) {
    stage_m *s = &W.st[i];
    expect(tb_stage_close(s->h), TB_OK, -1, "tb_stage_close");
    W.counts[N_CLOSE_LIVE] += s->nt > 0;
    retire(s->h, 3);
    s->open = 0;
    worker_gone(s->in);
}

static void close_client(void) {
    int k = PICK(W.c, MAXC);
    if (k < 0)
        return;
    note("close client %d (%d open handles)", k, children(k));
    if (children(k) > 0) {
        expect(tb_client_close(W.c[k].h), TB_ERR_BUSY, -1, "tb_client_close with open handles");
        W.counts[N_BUSY]++;
        if (chance(50))
            return;
        for (int i = 0; i < MAXS; i++)
            if (W.s[i].open && W.s[i].client == k)
                close_consumer_i(i, 0);
        for (int i = 0; i < MAXST; i++)
            if (W.st[i].open && W.st[i].client == k)
                close_stage_i(i);
        for (int i = 0; i < MAXP; i++)
            if (W.p[i].open && W.p[i].client == k)
                close_producer_i(i);
    }
    expect(tb_client_close(W.c[k].h), TB_OK, -1, "tb_client_close");
    retire(W.c[k].h, 0);
    W.c[k].open = 0;
}

static void open_producer(void) {
    int k = PICK(W.c, MAXC);
    if (k < 0)
        return;
    for (int i = 0; i < MAXP; i++)
        if (!prod_live(i) && writer_clean(i)) {
            int ch = below(NCH);
            note("producer %d = client %d on %s", i, k, CH[ch]);
            tb_producer *h = NULL;
            tb_status s = tb_producer_open(W.c[k].h, CH[ch], &h);
            expect(s, TB_OK, TB_ERR_LIMIT_REACHED, "tb_producer_open");
            if (s != TB_OK) {
                W.counts[N_LIMIT]++;
                return;
            }
            W.p[i] = (prod_m){.h = h, .open = 1, .client = k, .ch = ch};
            W.wq_out[i] = 0;
            W.wgen[i]++;
            return;
        }
}

static void open_consumer(void) {
    int k = PICK(W.c, MAXC);
    if (k < 0)
        return;
    for (int i = 0; i < MAXS; i++)
        if (!cons_live(i)) {
            int ch = below(NCH);
            tb_policy pol = (tb_policy)(1 + below(4));
            int depth = 1 + below(RING);
            int how = below(4), eos = how != 3;
            note("consumer %d = client %d on %s policy %u depth %d via %s", i, k, CH[ch], (unsigned)pol,
                 depth, (const char *[]){"open", "open_wait", "open_with", "open_with NO_END_OF_STREAM"}[how]);
            tb_consumer *h = NULL;
            tb_status s;
            if (how == 0) {
                s = tb_consumer_open(W.c[k].h, CH[ch], pol, (uint32_t)depth, &h);
            } else if (how == 1) { /* the channel exists: no wait */
                s = tb_consumer_open_wait(W.c[k].h, CH[ch], pol, (uint32_t)depth, TB_TIMEOUT_INFINITE, &h);
            } else {
                tb_consumer_options o = TB_CONSUMER_OPTIONS_INIT;
                o.policy = pol;
                o.depth = (uint32_t)depth;
                o.flags = eos ? 0 : TB_CONSUMER_NO_END_OF_STREAM;
                s = tb_consumer_open_with(W.c[k].h, CH[ch], &o, &h);
            }
            expect(s, TB_OK, TB_ERR_LIMIT_REACHED, "tb_consumer_open");
            if (s != TB_OK) {
                W.counts[N_LIMIT]++;
                return;
            }
            cons_m *c = &W.s[i];
            memset(c, 0, sizeof *c);
            *c = (cons_m){.h = h, .open = 1, .client = k, .ch = ch, .policy = (int)pol,
                          .depth = pol == TB_POLICY_LATEST ? 1 : depth, .eos = eos};
            if (is_wq(ch) && pol != TB_POLICY_BLOCK)
                for (uint32_t id = 1; id <= W.next_id; id++)
                    if (W.items[id].wq == ch)
                        W.items[id].must = 0;
            return;
        }
}

static void open_stage(void) {
    int k = PICK(W.c, MAXC);
    if (k < 0)
        return;
    for (int i = 0; i < MAXST; i++)
        if (!stage_live(i) && writer_clean(MAXP + i)) {
            int in = 2 + below(2);
            int out;
            switch (below(4)) {
            case 0: out = in; break;      /* its own input (a retry loop) */
            case 1: out = 5 - in; break;  /* the other work queue (loops of two) */
            case 2: out = below(2); break; /* a broadcast channel */
            default: out = 4; break;       /* a channel of another pool */
            }
            int eos = chance(75);
            note("stage %d = client %d %s -> %s%s", i, k, CH[in], CH[out], eos ? "" : " NO_END_OF_STREAM");
            tb_stage *h = NULL;
            tb_consumer_options o = TB_CONSUMER_OPTIONS_INIT;
            o.flags = TB_CONSUMER_NO_END_OF_STREAM;
            tb_status s = eos ? tb_stage_open(W.c[k].h, CH[in], CH[out], &h)
                              : tb_stage_open_with(W.c[k].h, CH[in], CH[out], &o, &h);
            expect(s, TB_OK, TB_ERR_LIMIT_REACHED, "tb_stage_open");
            if (s != TB_OK) {
                W.counts[N_LIMIT]++;
                return;
            }
            W.st[i] = (stage_m){.h = h, .open = 1, .client = k, .in = in, .out = out, .eos = eos};
            W.wq_out[MAXP + i] = 0;
            W.wgen[MAXP + i]++;
            return;
        }
}

static void publish(int i, int k);

/* Loans on an open producer (also one that holds loans), or publishes (or
 * releases) a held loan (also of a closed producer). */
static void loan(void) {
    int i = pick_if(MAXP, prod_live);
    if (i < 0)
        return;
    prod_m *p = &W.p[i];
    if (p->nloans > 0 && (!p->open || p->nloans == MAXLOANS || chance(50))) {
        publish(i, below(p->nloans));
        return;
    }
    int pool = CH_POOL[p->ch];
    int full = held_in_pool(pool) == POOL_SLOTS[pool];
    size_t n = 4 + (size_t)below(60);
    int wait = chance(20);
    note("producer %d loan %zu on %s%s (model: %s, %d loans held)", i, n, CH[p->ch],
         wait ? " with 1 ms" : "", full ? "full" : "room", p->nloans);
    tb_tensor *t = NULL;
    tb_status s = wait ? tb_loan_timeout(p->h, TB_DTYPE_U8, 1, &n, 1000000, &t)
                       : tb_loan(p->h, TB_DTYPE_U8, 1, &n, &t);
    expect(s, TB_OK, wait ? TB_ERR_TIMEOUT : TB_ERR_POOL_EXHAUSTED, "tb_loan");
    if (s != TB_OK) {
        if (t != NULL)
            fail("failed loan left *out set");
        W.counts[N_EXHAUSTED]++;
        return;
    }
    if (full)
        fail("loan on %s succeeded although the model holds all %d slots of its pool (a hold was lost)",
             CH[p->ch], POOL_SLOTS[pool]);
    void *d = NULL;
    size_t nb = 0;
    expect(tb_tensor_data(t, &d, &nb), TB_OK, -1, "tb_tensor_data of a loan");
    if (!d || nb != n)
        fail("loan of %zu bytes gave %zu", n, nb);
    uint32_t id = ++W.next_id;
    memcpy(d, &id, 4);
    memset((char *)d + 4, (int)(id & 0xff), n - 4);
    if (chance(30))
        expect(tb_tensor_set_user_header(t, &id, 4), TB_OK, -1, "tb_tensor_set_user_header");
    W.items[id] = (item){.pool = pool, .wq = -1, .loaned = 1};
    W.counts[N_MORE] += p->nloans > 0;
    p->loan[p->nloans] = t;
    p->loan_id[p->nloans] = id;
    p->nloans++;
}

/* Publishes (or releases) loan `k` of producer `i`. */
static void publish(int i, int k) {
    prod_m *p = &W.p[i];
    uint32_t id = p->loan_id[k];
    tb_tensor *t = p->loan[k];
    still_valid(t, id, p->open, "loan");
    p->nloans--;
    p->loan[k] = p->loan[p->nloans];
    p->loan_id[k] = p->loan_id[p->nloans];
    it(id)->loaned = 0;
    if (!room(i, p->ch) || chance(10)) {
        note("producer %d releases loan %u", i, id);
        release_tensor(t, "tb_release of a loan");
        return;
    }
    note("producer %d%s publishes %u on %s", i, p->open ? "" : " (closed)", id, CH[p->ch]);
    uint32_t delivered = 12345;
    expect(tb_publish(t, &delivered), TB_OK, -1, "tb_publish");
    retire(t, 4);
    published(id, i, p->ch, delivered);
}

/* Receives once from consumer `i` into its held list; returns whether a tensor came. */
static int recv_one(int i, uint64_t timeout_ns) {
    cons_m *c = &W.s[i];
    int empty = 1;
    for (int w = 0; w < MAXW; w++)
        empty &= c->rowlen[w] == 0;
    sync_ended();
    tb_status none = c->eos && g_ended[c->ch] ? TB_END_OF_STREAM : TB_ERR_TIMEOUT;
    tb_tensor *t = (tb_tensor *)0x1;
    tb_status s = tb_recv(c->h, timeout_ns, &t);
    if (is_wq(c->ch) || empty)
        expect(s, none, TB_OK, "tb_recv");
    else
        expect(s, TB_OK, -1, "tb_recv");
    if (s != TB_OK) {
        if (t != NULL)
            fail("tb_recv returned %s but left *out set", tb_status_str((int)s));
        if (!is_wq(c->ch) && !empty)
            fail("consumer %d on %s got nothing, but the model queues tensors for it", i, CH[c->ch]);
        if (!is_wq(c->ch)) {
            uint64_t d = 0;
            expect(tb_consumer_dropped(c->h, &d), TB_OK, -1, "tb_consumer_dropped");
            if (d != c->dropped)
                fail("consumer %d dropped %llu, the model says %llu", i, (unsigned long long)d,
                     (unsigned long long)c->dropped);
        }
        W.counts[s == TB_END_OF_STREAM ? N_EOS : N_EMPTY]++;
        return 0;
    }
    uint32_t id = payload_id(t);
    note("consumer %d got %u", i, id);
    received(id, c->ch, i);
    it(id)->held++;
    c->held[c->nheld] = t;
    c->held_id[c->nheld] = id;
    c->nheld++;
    return 1;
}

static void recv_step(void) {
    int i = pick_if(MAXS, cons_live);
    if (i < 0)
        return;
    cons_m *c = &W.s[i];
    if (!c->open || c->nheld == MAXHELD || (c->nheld > 0 && chance(40))) {
        note("consumer %d releases one of %d", i, c->nheld);
        release_held(c, below(c->nheld));
        return;
    }
    uint64_t timeout = chance(70) ? 0 : 1000000;
    note("consumer %d recv %llu ns", i, (unsigned long long)timeout);
    if (recv_one(i, timeout) && chance(50))
        release_held(c, c->nheld - 1);
}

/* Takes a tensor on an open stage (also one that holds tensors), or
 * forwards (or releases) a staged tensor (also of a closed stage). */
static void stage_step(void) {
    int i = pick_if(MAXST, stage_live);
    if (i < 0)
        return;
    stage_m *s = &W.st[i];
    if (s->open && s->nt < MAXSTAGED && (s->nt == 0 || chance(50))) {
        uint64_t timeout = chance(70) ? 0 : 1000000;
        note("stage %d recv_mut %llu ns (%d held)", i, (unsigned long long)timeout, s->nt);
        tb_tensor *t = NULL;
        sync_ended();
        tb_status st = tb_recv_mut(s->h, timeout, &t);
        expect(st, TB_OK, s->eos && g_ended[s->in] ? TB_END_OF_STREAM : TB_ERR_TIMEOUT, "tb_recv_mut");
        W.counts[N_EOS] += st == TB_END_OF_STREAM;
        if (st != TB_OK)
            return;
        uint32_t id = payload_id(t);
        note("stage %d has %u", i, id);
        received(id, s->in, -1);
        it(id)->staged = 1;
        W.counts[N_MORE] += s->nt > 0;
        s->t[s->nt] = t;
        s->t_id[s->nt] = id;
        s->nt++;
        void *d = NULL;
        size_t n = 0;
        expect(tb_tensor_data(t, &d, &n), TB_OK, -1, "tb_tensor_data of a staged tensor");
        for (size_t k = 4; k < n; k++)
            ((uint8_t *)d)[k]++;
        return;
    }
    int k = below(s->nt);
    tb_tensor *t = s->t[k];
    uint32_t id = s->t_id[k];
    still_valid(t, id, s->open, "staged tensor");
    s->nt--;
    s->t[k] = s->t[s->nt];
    s->t_id[k] = s->t_id[s->nt];
    it(id)->staged = 0;
    int writer = MAXP + i;
    if (chance(20) || !room(writer, s->out)) {
        note("stage %d releases %u", i, id);
        release_tensor(t, "tb_release of a staged tensor");
        W.counts[N_STAGE_REL]++;
        return;
    }
    note("stage %d%s forwards %u to %s", i, s->open ? "" : " (closed)", id, CH[s->out]);
    uint32_t delivered = 12345;
    tb_status st = tb_forward(t, &delivered);
    retire(t, 4);
    if (CH_POOL[s->out] != CH_POOL[s->in]) {
        /* The output channel does not use the slot's pool: refused, released. */
        expect(st, TB_ERR_INVALID_ARGUMENT, -1, "tb_forward to a channel of another pool");
        return;
    }
    expect(st, TB_OK, -1, "tb_forward");
    W.counts[s->out == s->in ? N_FWD_SELF : N_FWD]++;
    published(id, writer, s->out, delivered);
}

/* A recently retired handle of `kind`, or NULL. */
static void *stale(int kind) {
    for (int k = 0; k < NSTALE && k < W.nstale; k++) {
        stale_m *x = &W.stale[(W.nstale - 1 - k) % NSTALE];
        if (x->kind == kind && W.retired - x->when < STALE_WINDOW)
            return x->p;
    }
    return NULL;
}

/* Calls that must fail and change nothing. */
static void hostile(void) {
    W.counts[N_HOSTILE]++;
    int what = below(14);
    note("hostile %d", what);
    tb_tensor *t = (tb_tensor *)0x1;
    size_t n = 16;
    const char *I = "hostile call";
    switch (what) {
    case 0: { /* NULL handles and outs */
        expect(tb_client_close(NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_producer_close(NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_consumer_close(NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_stage_close(NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_loan(NULL, TB_DTYPE_U8, 1, &n, &t), TB_ERR_INVALID_ARGUMENT, -1, I);
        if (t != NULL)
            fail("a failed tb_loan left *out set");
        expect(tb_recv(NULL, 0, &t), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_recv_mut(NULL, 0, &t), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_publish(NULL, NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_forward(NULL, NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_release(NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        uint64_t u;
        expect(tb_tensor_seq(NULL, &u), TB_ERR_INVALID_ARGUMENT, -1, I);
        expect(tb_consumer_dropped(NULL, &u), TB_ERR_INVALID_ARGUMENT, -1, I);
        int k = PICK(W.c, MAXC);
        if (k >= 0) {
            expect(tb_producer_open(W.c[k].h, CH[0], NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
            expect(tb_consumer_open(W.c[k].h, NULL, 0, 0, (tb_consumer **)&t), TB_ERR_INVALID_ARGUMENT, -1, I);
        }
        break;
    }
    case 1: { /* closed and released handles the registry still remembers */
        void *c = stale(0), *p = stale(1), *s = stale(2), *g = stale(3), *x = stale(4);
        uint32_t u32;
        if (c) {
            expect(tb_client_close(c), TB_ERR_INVALID_ARGUMENT, -1, "tb_client_close of a closed client");
            expect(tb_client_id(c, &u32), TB_ERR_INVALID_ARGUMENT, -1, I);
            expect(tb_producer_open(c, CH[0], (tb_producer **)&t), TB_ERR_INVALID_ARGUMENT, -1, I);
        }
        if (p) {
            expect(tb_loan(p, TB_DTYPE_U8, 1, &n, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_loan on a closed producer");
            expect(tb_producer_close(p), TB_ERR_INVALID_ARGUMENT, -1, I);
        }
        if (s) {
            expect(tb_recv(s, 0, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_recv on a closed consumer");
            expect(tb_consumer_close(s), TB_ERR_INVALID_ARGUMENT, -1, I);
        }
        if (g) {
            expect(tb_recv_mut(g, 0, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_recv_mut on a closed stage");
            expect(tb_stage_close(g), TB_ERR_INVALID_ARGUMENT, -1, I);
        }
        if (x) {
            const void *d;
            expect(tb_release(x), TB_ERR_INVALID_ARGUMENT, -1, "double release");
            expect(tb_publish(x, NULL), TB_ERR_INVALID_ARGUMENT, -1, "tb_publish of a released tensor");
            expect(tb_forward(x, NULL), TB_ERR_INVALID_ARGUMENT, -1, "tb_forward of a released tensor");
            expect(tb_tensor_const_data(x, &d, NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        }
        W.counts[N_STALE] += (c != NULL) + (p != NULL) + (s != NULL) + (g != NULL) + (x != NULL);
        break;
    }
    case 2: { /* wrong-kind handles */
        int i = PICK(W.p, MAXP), j = PICK(W.s, MAXS);
        if (i >= 0) {
            expect(tb_consumer_close((tb_consumer *)W.p[i].h), TB_ERR_INVALID_ARGUMENT, -1, I);
            expect(tb_release((tb_tensor *)W.p[i].h), TB_ERR_INVALID_ARGUMENT, -1, I);
            expect(tb_client_close((tb_client *)W.p[i].h), TB_ERR_INVALID_ARGUMENT, -1, I);
        }
        if (j >= 0)
            expect(tb_recv_mut((tb_stage *)W.s[j].h, 0, &t), TB_ERR_INVALID_ARGUMENT, -1, I);
        int on_stack = 0;
        expect(tb_release((tb_tensor *)&on_stack), TB_ERR_INVALID_ARGUMENT, -1, I);
        break;
    }
    case 3: { /* tb_publish / tb_forward / tb_tensor_data on received tensors */
        int j = PICK(W.s, MAXS);
        if (j < 0 || W.s[j].nheld == 0)
            break;
        tb_tensor *r = W.s[j].held[0];
        void *d = (void *)0x1;
        size_t nb = 7;
        expect(tb_publish(r, NULL), TB_ERR_INVALID_ARGUMENT, -1, "tb_publish of a received tensor");
        expect(tb_forward(r, NULL), TB_ERR_INVALID_ARGUMENT, -1, "tb_forward of a received tensor");
        expect(tb_tensor_data(r, &d, &nb), TB_ERR_READ_ONLY, -1, "tb_tensor_data of a received tensor");
        if (d != NULL || nb != 0)
            fail("tb_tensor_data refused a received tensor but left *data/*nbytes set");
        expect(tb_tensor_set_user_header(r, "x", 1), TB_ERR_READ_ONLY, -1, I);
        if (payload_id(r) != W.s[j].held_id[0])
            fail("a refused call changed a received tensor");
        size_t ndim = 0, dims[1];
        expect(tb_tensor_shape(r, &ndim, dims, 0), TB_ERR_INVALID_ARGUMENT, -1, "tb_tensor_shape, capacity 0");
        if (ndim != 1)
            fail("tb_tensor_shape set ndim %zu", ndim);
        break;
    }
    case 4: { /* tb_forward on a loan, tb_publish on a staged tensor (also of closed handles) */
        int i = pick_if(MAXP, prod_live), g = pick_if(MAXST, stage_live);
        if (i >= 0 && W.p[i].nloans > 0) {
            expect(tb_forward(W.p[i].loan[0], NULL), TB_ERR_INVALID_ARGUMENT, -1, "tb_forward of a loan");
            if (payload_id(W.p[i].loan[0]) != W.p[i].loan_id[0])
                fail("a refused call changed a loan");
        }
        if (g >= 0 && W.st[g].nt > 0) {
            expect(tb_publish(W.st[g].t[0], NULL), TB_ERR_INVALID_ARGUMENT, -1, "tb_publish of a staged tensor");
            if (payload_id(W.st[g].t[0]) != W.st[g].t_id[0])
                fail("a refused call changed a staged tensor");
        }
        break;
    }
    case 5: { /* bad dtypes and shapes */
        int i = PICK(W.p, MAXP);
        if (i < 0)
            break;
        tb_producer *p = W.p[i].h;
        size_t nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
        size_t huge[2] = {SIZE_MAX / 2, 4};
        size_t widest[2] = {UINT32_MAX, 2};
        size_t big[1] = {1 << 20};
        size_t zero[2] = {3, 0};
        expect(tb_loan(p, 99, 1, &n, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_loan of dtype 99");
        expect(tb_loan(p, 0, 1, &n, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_loan of dtype 0");
        expect(tb_loan(p, TB_DTYPE_F32, 9, nine, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_loan of 9 dims");
        expect(tb_loan(p, TB_DTYPE_F32, 2, NULL, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_loan of a NULL shape");
        expect(tb_loan(p, TB_DTYPE_F32, 2, huge, &t), TB_ERR_INVALID_ARGUMENT, -1, "tb_loan of an extent above UINT32_MAX");
        expect(tb_loan(p, TB_DTYPE_F32, 2, widest, &t), TB_ERR_TOO_LARGE, -1, "tb_loan of extent UINT32_MAX");
        expect(tb_loan(p, TB_DTYPE_F32, 1, big, &t), TB_ERR_TOO_LARGE, -1, "tb_loan larger than a slot");
        int pool = CH_POOL[W.p[i].ch];
        int full = held_in_pool(pool) == POOL_SLOTS[pool];
        const size_t *shapes[2] = {zero, NULL};
        size_t ndims[2] = {2, 0};
        for (int k = 0; k < 2; k++) { /* zero-sized, and a scalar (ndim 0) */
            tb_status s = tb_loan(p, TB_DTYPE_F32, ndims[k], shapes[k], &t);
            expect(s, TB_ERR_POOL_EXHAUSTED, full ? -1 : TB_OK, k ? "tb_loan of a scalar" : "tb_loan of a zero-sized tensor");
            if (s == TB_OK) {
                size_t nb = 99, nd = 99, dims[2];
                const void *d;
                expect(tb_tensor_const_data(t, &d, &nb), TB_OK, -1, I);
                expect(tb_tensor_shape(t, &nd, dims, 2), TB_OK, -1, I);
                if (nb != (k ? 4u : 0u) || nd != ndims[k])
                    fail("loan of %s: %zu bytes, %zu dims", k ? "a scalar" : "zero size", nb, nd);
                release_tensor(t, "tb_release of a loan");
            }
        }
        break;
    }
    case 6: { /* unknown channels, bad names, bad options */
        int k = PICK(W.c, MAXC);
        if (k < 0)
            break;
        tb_client *c = W.c[k].h;
        tb_producer *p = (tb_producer *)0x1;
        tb_consumer *s = NULL;
        tb_stage *g = NULL;
        expect(tb_producer_open(c, "r/none", &p), TB_ERR_NO_CHANNEL, -1, "tb_producer_open of an unknown channel");
        if (p != NULL)
            fail("a failed open left *out set");
        expect(tb_consumer_open(c, "bad name\n", 0, 0, &s), TB_ERR_INVALID_ARGUMENT, TB_ERR_NO_CHANNEL, "tb_consumer_open of a bad name");
        expect(tb_consumer_open(c, "", 0, 0, &s), TB_ERR_INVALID_ARGUMENT, TB_ERR_NO_CHANNEL, "tb_consumer_open of an empty name");
        expect(tb_consumer_open(c, CH[0], 42, 0, &s), TB_ERR_INVALID_ARGUMENT, -1, "tb_consumer_open of policy 42");
        expect(tb_consumer_open(c, CH[0], TB_POLICY_BLOCK, RING + 1, &s), TB_ERR_INVALID_ARGUMENT, -1, "tb_consumer_open deeper than a ring");
        expect(tb_stage_open(c, CH[0], CH[2], &g), TB_ERR_INVALID_ARGUMENT, -1, "tb_stage_open on a broadcast input");
        expect(tb_stage_open(c, "r/none", CH[2], &g), TB_ERR_NO_CHANNEL, -1, "tb_stage_open on an unknown input");
        expect(tb_stage_open(c, CH[2], "r/none", &g), TB_ERR_NO_CHANNEL, -1, "tb_stage_open to an unknown output");
        char bad[2] = {(char)0xff, 0};
        expect(tb_producer_open(c, bad, &p), TB_ERR_INVALID_ARGUMENT, TB_ERR_NO_CHANNEL, "tb_producer_open of non-UTF-8");
        expect(tb_channel_remove(c, CH[below(NCH)]), TB_ERR_PERMISSION_DENIED, -1, "tb_channel_remove of a declared channel");
        expect(tb_channel_remove(c, "r/none"), TB_ERR_NO_CHANNEL, -1, "tb_channel_remove of an unknown channel");
        expect(tb_consumer_open_wait(c, "r/wait-none", 0, 0, 1000000, &s), TB_ERR_TIMEOUT, -1, "tb_consumer_open_wait of a missing channel");
        if (s != NULL)
            fail("a timed-out wait left *out set");
        break;
    }
    case 7: { /* a client with open handles refuses to close; tensors of
               * closed handles are intact and their metadata answers */
        int k = PICK(W.c, MAXC);
        if (k >= 0 && children(k) > 0) {
            expect(tb_client_close(W.c[k].h), TB_ERR_BUSY, -1, "tb_client_close with open handles");
            W.counts[N_BUSY]++;
        }
        for (int i = 0; i < MAXP; i++)
            for (int l = 0; l < W.p[i].nloans; l++) {
                still_valid(W.p[i].loan[l], W.p[i].loan_id[l], W.p[i].open, "loan");
                void *d = NULL;
                expect(tb_tensor_data(W.p[i].loan[l], &d, NULL), TB_OK, -1, "tb_tensor_data of a loan");
            }
        for (int j = 0; j < MAXS; j++)
            for (int l = 0; l < W.s[j].nheld; l++) {
                uint64_t u;
                still_valid(W.s[j].held[l], W.s[j].held_id[l], W.s[j].open, "received tensor");
                expect(tb_tensor_seq(W.s[j].held[l], &u), TB_OK, -1, I);
            }
        for (int g = 0; g < MAXST; g++)
            for (int l = 0; l < W.st[g].nt; l++) {
                void *d = NULL;
                still_valid(W.st[g].t[l], W.st[g].t_id[l], W.st[g].open, "staged tensor");
                expect(tb_tensor_data(W.st[g].t[l], &d, NULL), TB_OK, -1, "tb_tensor_data of a staged tensor");
            }
        break;
    }
    default: { /* metadata of held tensors */
        int j = PICK(W.s, MAXS);
        if (j < 0 || W.s[j].nheld == 0)
            break;
        tb_tensor *r = W.s[j].held[below(W.s[j].nheld)];
        uint64_t u;
        uint32_t pid;
        tb_dtype dt;
        const uint8_t *h;
        size_t hl;
        expect(tb_tensor_seq(r, &u), TB_OK, -1, I);
        expect(tb_tensor_timestamp_ns(r, &u), TB_OK, -1, I);
        expect(tb_tensor_producer_id(r, &pid), TB_OK, -1, I);
        expect(tb_tensor_dtype(r, &dt), TB_OK, -1, I);
        expect(tb_tensor_user_header(r, &h, &hl), TB_OK, -1, I);
        if (dt != TB_DTYPE_U8 || hl > TB_USER_HEADER_LEN)
            fail("received tensor has dtype %u, user header %zu bytes", (unsigned)dt, hl);
        expect(tb_tensor_seq(r, NULL), TB_ERR_INVALID_ARGUMENT, -1, I);
        break;
    }
    }
}

static void step(void) {
    int r = below(100);
    if (r < 4) open_client();
    else if (r < 6) close_client();
    else if (r < 11) open_producer();
    else if (r < 13) { int i = PICK(W.p, MAXP); if (i >= 0) { note("close producer %d", i); close_producer_i(i); } }
    else if (r < 19) open_consumer();
    else if (r < 22) { int i = PICK(W.s, MAXS); if (i >= 0) { note("close consumer %d", i); close_consumer_i(i, chance(50)); } }
    else if (r < 25) open_stage();
    else if (r < 27) { int i = PICK(W.st, MAXST); if (i >= 0) { note("close stage %d", i); close_stage_i(i); } }
    else if (r < 51) loan();
    else if (r < 73) recv_step();
    else if (r < 92) stage_step();
    else hostile();
    sync_ended();
}

/* Releases every held tensor, drains every worker, checks that no
 * must-arrive item is missing, closes all. */
static void finish(void) {
    note("final drain");
    for (int i = 0; i < MAXP; i++)
        while (W.p[i].nloans > 0) {
            prod_m *p = &W.p[i];
            p->nloans--;
            still_valid(p->loan[p->nloans], p->loan_id[p->nloans], p->open, "loan");
            release_tensor(p->loan[p->nloans], "tb_release of a loan");
            it(p->loan_id[p->nloans])->loaned = 0;
        }
    for (int i = 0; i < MAXS; i++)
        while (W.s[i].nheld > 0)
            release_held(&W.s[i], 0);
    for (int i = 0; i < MAXST; i++)
        while (W.st[i].nt > 0) {
            stage_m *g = &W.st[i];
            g->nt--;
            still_valid(g->t[g->nt], g->t_id[g->nt], g->open, "staged tensor");
            release_tensor(g->t[g->nt], "tb_release of a staged tensor");
            it(g->t_id[g->nt])->staged = 0;
        }
    for (int quiet = 0; quiet < 3;) {
        int got = 0;
        for (int i = 0; i < MAXS; i++)
            if (W.s[i].open && is_wq(W.s[i].ch))
                while (recv_one(i, 5000000)) {
                    release_held(&W.s[i], 0);
                    got = 1;
                }
        for (int i = 0; i < MAXST; i++) {
            if (!W.st[i].open)
                continue;
            for (;;) {
                tb_tensor *t = NULL;
                sync_ended();
                tb_status s = tb_recv_mut(W.st[i].h, 5000000, &t);
                expect(s, TB_OK, W.st[i].eos && g_ended[W.st[i].in] ? TB_END_OF_STREAM : TB_ERR_TIMEOUT,
                       "tb_recv_mut (final drain)");
                if (s != TB_OK)
                    break;
                received(payload_id(t), W.st[i].in, -1);
                release_tensor(t, "tb_release of a staged tensor");
                got = 1;
            }
        }
        quiet = got ? 0 : quiet + 1;
    }
    for (uint32_t id = 1; id <= W.next_id; id++) {
        item *x = &W.items[id];
        if (x->wq >= 0 && x->must) {
            int n, depth, lossy;
            workers(x->wq, &n, &depth, &lossy);
            if (n > 0)
                fail("work item %u queued on %s was never received after the final drain", id, CH[x->wq]);
        }
    }
    for (int i = 0; i < MAXS; i++)
        if (W.s[i].open)
            close_consumer_i(i, 0);
    for (int i = 0; i < MAXST; i++)
        if (W.st[i].open)
            close_stage_i(i);
    for (int i = 0; i < MAXP; i++)
        if (W.p[i].open)
            close_producer_i(i);
    for (int k = 0; k < MAXC; k++)
        if (W.c[k].open) {
            expect(tb_client_close(W.c[k].h), TB_OK, -1, "tb_client_close");
            W.c[k].open = 0;
        }
    sync_ended();
}

/* Every slot is free: a fresh client loans every slot of every pool, all
 * from one producer per pool (which it closes before releasing them). */
static void all_slots_free(void) {
    tb_client *c = NULL;
    expect(tb_client_connect(W.socket, "rnd-check", &c), TB_OK, -1, "tb_client_connect");
    for (int pool = 0; pool < NPOOL; pool++) {
        tb_producer *p = NULL;
        tb_tensor *t[16] = {0};
        size_t n = 8;
        expect(tb_producer_open(c, CH[pool == 0 ? 0 : 4], &p), TB_OK, -1, "tb_producer_open (slot check)");
        for (int k = 0; k <= POOL_SLOTS[pool]; k++) {
            tb_status s = TB_ERR_POOL_EXHAUSTED;
            /* The broker frees closed subscribers' queues at once but
             * redispatches asynchronously: allow it a moment. */
            for (int tries = 0; tries < 200 && s == TB_ERR_POOL_EXHAUSTED && k < POOL_SLOTS[pool]; tries++) {
                s = tb_loan(p, TB_DTYPE_U8, 1, &n, &t[k]);
                if (s == TB_ERR_POOL_EXHAUSTED)
                    usleep(10000);
            }
            if (k == POOL_SLOTS[pool])
                s = tb_loan(p, TB_DTYPE_U8, 1, &n, &t[k]);
            expect(s, k < POOL_SLOTS[pool] ? TB_OK : TB_ERR_POOL_EXHAUSTED, -1,
                   k < POOL_SLOTS[pool] ? "loan of a slot that must be free once every client closed"
                                        : "loan of one slot more than the pool has");
        }
        expect(tb_producer_close(p), TB_OK, -1, "tb_producer_close (loans alive)");
        for (int k = 0; k < POOL_SLOTS[pool]; k++)
            if (t[k])
                expect(tb_release(t[k]), TB_OK, -1, "tb_release");
        g_ended[pool == 0 ? 0 : 4] = 1; /* its broker handle closed with the last loan */
    }
    expect(tb_client_close(c), TB_OK, -1, "tb_client_close");
}

static uint64_t env_u64(const char *name, uint64_t dflt, int *set) {
    const char *v = getenv(name);
    if (set)
        *set = v && *v;
    if (!v || !*v)
        return dflt;
    char *end = NULL;
    uint64_t x = strtoull(v, &end, 0);
    if (!end || *end) {
        fprintf(stderr, "%s=%s is not a number\n", name, v);
        exit(2);
    }
    return x;
}

static void run(uint64_t seed, long calls) {
    printf("random_sequences: seed %llu, %ld calls (rerun: TENSORBUS_RANDOM_SEED=%llu make -C bindings/c test)\n",
           (unsigned long long)seed, calls, (unsigned long long)seed);
    fflush(stdout);
    free(W.items);
    const char *sock = W.socket;
    memset(&W, 0, sizeof W);
    W.socket = sock;
    W.seed = seed;
    W.rng = seed;
    W.nitems = (uint32_t)calls + 16;
    W.items = calloc(W.nitems, sizeof(item));
    if (!W.items) {
        perror("calloc");
        exit(2);
    }
    for (W.step = 0; W.step < calls; W.step++)
        step();
    finish();
    all_slots_free();
    printf("random_sequences: seed %llu ok:", (unsigned long long)seed);
    for (int k = 0; k < N_COUNTS; k++)
        printf(" %s %ld%s", COUNT_NAMES[k], W.counts[k], k + 1 < N_COUNTS ? "," : "\n");
    fflush(stdout);
    free(W.items);
    W.items = NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TENSORBUS_BIN BROKER_CONFIG\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int seed_set = 0;
    uint64_t seed = env_u64("TENSORBUS_RANDOM_SEED", (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32), &seed_set);
    long calls = (long)env_u64("TENSORBUS_RANDOM_CALLS", 3000, NULL);
    alarm((unsigned)(600 + calls / 50)); /* a hung call fails instead of hanging CI */

    char dir[] = "/tmp/tb-crandom-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    static char sock[64];
    snprintf(sock, sizeof sock, "%s/broker.sock", dir);
    pid_t broker = fork();
    g_broker = broker;
    if (broker < 0) {
        perror("fork");
        return 2;
    }
    if (broker == 0) {
        execl(argv[1], argv[1], "broker", "--config", argv[2], "--socket", sock, (char *)NULL);
        perror("exec broker");
        _exit(127);
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
        kill(broker, SIGKILL);
        waitpid(broker, NULL, 0);
        return 2;
    }
    W.socket = sock;
    if (!seed_set)
        for (size_t i = 0; i < sizeof REGRESSION_SEEDS / sizeof REGRESSION_SEEDS[0]; i++)
            run(REGRESSION_SEEDS[i], calls);
    run(seed, calls);

    kill(broker, SIGTERM);
    waitpid(broker, NULL, 0);
    unlink(sock);
    rmdir(dir);
    return 0;
}
