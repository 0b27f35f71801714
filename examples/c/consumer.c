/*
 * consumer: receives the example frames as read-only views of the producer's
 * shared memory, prints them and checks every value.
 *
 * It reads the frames of examples/{rust,python,c}/producer.* (4 x 8 float32,
 * element i of frame n is n * 100 + i, user header: frame counter uint64 LE +
 * stage count uint32 LE), directly or after any number of stages (each
 * doubled every value and added one to the stage count). It checks the
 * shape, the dtype, every value, and that the frame counters follow each
 * other; it exits with status 1 on the first mismatch.
 *
 *   tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
 *   make -C bindings/c examples
 *   target/tensorbus-c/consumer --socket /tmp/tb-ex.sock [--channel frames/doubled] [--count 10]
 *
 * Start it before the producer (a channel keeps no history). Options:
 * --channel NAME (default frames/doubled, the stage's output; frames/raw
 * reads the producer directly), --count N frames to receive (default 10),
 * --timeout S to wait for each one (default 10).
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <tensorbus.h>

enum { ROWS = 4, COLS = 8 };

/* Prints the failed call and why, and exits. */
static void check(tb_status s, const char *what) {
    if (s != TB_OK) {
        fprintf(stderr, "consumer: %s: %s: %s\n", what, tb_status_str((int)s),
                tb_last_error_message());
        exit(1);
    }
}

/* Prints a mismatch and exits. */
static void fail(const char *what, unsigned long long frame) {
    fprintf(stderr, "consumer: frame %llu: %s\n", frame, what);
    exit(1);
}

/* Little-endian loads, whatever the host's byte order. */
static uint64_t get_le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static const char usage[] =
    "usage: consumer [--socket PATH] [--channel NAME] [--count N] [--timeout S]\n"
    "Receives N frames (default 10) of a channel (default frames/doubled), prints their first\n"
    "row and checks every value; waits at most S seconds per frame (default 10); exits 1 on a\n"
    "mismatch. Start it before the producer. Broker config: examples/tensorbus.toml.\n";

int main(int argc, char **argv) {
    const char *socket = NULL; /* NULL: $TENSORBUS_SOCKET or the default */
    const char *channel = "frames/doubled";
    unsigned long long count = 10;
    double timeout_s = 10;
    static const struct option options[] = {
        {"socket", required_argument, NULL, 's'},
        {"channel", required_argument, NULL, 'c'},
        {"count", required_argument, NULL, 'n'},
        {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    for (int opt; (opt = getopt_long(argc, argv, "h", options, NULL)) != -1;) {
        switch (opt) {
        case 's': socket = optarg; break;
        case 'c': channel = optarg; break;
        case 'n': count = strtoull(optarg, NULL, 10); break;
        case 't': timeout_s = strtod(optarg, NULL); break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "consumer: unexpected argument \"%s\" (the socket is --socket PATH)\n%s", argv[optind], usage);
        return 2;
    }

    tb_client *client;
    tb_consumer *consumer;
    check(tb_client_connect(socket, "consumer.c", &client), "connect");
    /* Lossless: a producer waits for us rather than drop a frame. */
    check(tb_consumer_open(client, channel, TB_POLICY_BLOCK, 0, &consumer), "open consumer");
    printf("consumer: subscribed to %s\n", channel);
    fflush(stdout);

    unsigned long long expected = 0;
    for (unsigned long long n = 0; n < count; n++) {
        tb_tensor *t;
        check(tb_recv(consumer, (uint64_t)(timeout_s * 1e9), &t), "recv");
        const uint8_t *header;
        size_t header_len;
        check(tb_tensor_user_header(t, &header, &header_len), "user header");
        if (header_len < 12)
            fail("user header shorter than 12 bytes", n);
        unsigned long long frame = get_le(header, 8);
        unsigned stages = (unsigned)get_le(header + 8, 4);

        size_t ndim, shape[TB_MAX_DIMS];
        tb_dtype dtype;
        uint64_t seq;
        check(tb_tensor_shape(t, &ndim, shape, TB_MAX_DIMS), "shape");
        check(tb_tensor_dtype(t, &dtype), "dtype");
        check(tb_tensor_seq(t, &seq), "seq");
        if (ndim != 2 || shape[0] != ROWS || shape[1] != COLS || dtype != TB_DTYPE_F32)
            fail("not a 4x8 float32 tensor", frame);
        if (n > 0 && frame != expected)
            fail("out of order", frame);
        expected = frame + 1;

        const void *data;
        check(tb_tensor_const_data(t, &data, NULL), "data");
        const float *x = data; /* read-only: the producer's own bytes */
        float scale = 1.0f; /* each stage doubled every value */
        for (unsigned s = 0; s < stages; s++)
            scale *= 2.0f;
        for (int i = 0; i < ROWS * COLS; i++) {
            float want = (float)(frame * 100 + (unsigned long long)i) * scale;
            if (x[i] != want) {
                fprintf(stderr, "consumer: frame %llu element %d: %g, want %g\n", frame, i, x[i], want);
                exit(1);
            }
        }
        printf("consumer: frame %llu seq %llu stages %u row 0 [", frame, (unsigned long long)seq,
               stages);
        for (int i = 0; i < COLS; i++)
            printf(i ? ", %g" : "%g", x[i]);
        printf("] ok\n");
        fflush(stdout);
        check(tb_release(t), "release"); /* the slot can be reused now */
    }
    printf("consumer: %llu frames checked\n", count);
    check(tb_consumer_close(consumer), "close consumer");
    check(tb_client_close(client), "close client");
    return 0;
}
