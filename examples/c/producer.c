/*
 * producer: publishes small float32 frames, written in place in shared memory.
 *
 * Every frame is a 4 x 8 float32 tensor; element i (row-major) of frame n is
 * n * 100 + i. The user header carries the frame counter (uint64, little-
 * endian, bytes 0..8) and how many stages changed the frame (uint32, bytes
 * 8..12; 0 here). The same frames come from examples/rust/producer.rs and
 * examples/python/producer.py, so any consumer or stage of the three
 * languages reads them.
 *
 *   tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
 *   make -C bindings/c examples          # builds target/tensorbus-c/producer, stage, consumer
 *   target/tensorbus-c/consumer --socket /tmp/tb-ex.sock --channel frames/raw &
 *   target/tensorbus-c/producer --socket /tmp/tb-ex.sock [--count 10] [--interval-ms 100]
 *
 * Without --socket it connects to $TENSORBUS_SOCKET or the default socket.
 * Options: --channel NAME (default frames/raw), --count N frames (default 10),
 * --interval-ms MS between frames (default 100).
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <tensorbus.h>

enum { ROWS = 4, COLS = 8 };

/* Prints the failed call and why, and exits. */
static void check(tb_status s, const char *what) {
    if (s != TB_OK) {
        fprintf(stderr, "producer: %s: %s: %s\n", what, tb_status_str((int)s),
                tb_last_error_message());
        exit(1);
    }
}

/* Little-endian stores, whatever the host's byte order. */
static void put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static const char usage[] =
    "usage: producer [--socket PATH] [--channel NAME] [--count N] [--interval-ms MS]\n"
    "Publishes N example frames (4 x 8 float32, default 10) on a channel (default frames/raw),\n"
    "one every MS milliseconds (default 100). --socket: default $TENSORBUS_SOCKET, then the\n"
    "default socket path. Broker config: examples/tensorbus.toml (see examples/README.md).\n";

int main(int argc, char **argv) {
    const char *socket = NULL; /* NULL: $TENSORBUS_SOCKET or the default */
    const char *channel = "frames/raw";
    unsigned long long count = 10, interval_ms = 100;
    static const struct option options[] = {
        {"socket", required_argument, NULL, 's'},
        {"channel", required_argument, NULL, 'c'},
        {"count", required_argument, NULL, 'n'},
        {"interval-ms", required_argument, NULL, 'i'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    for (int opt; (opt = getopt_long(argc, argv, "h", options, NULL)) != -1;) {
        switch (opt) {
        case 's': socket = optarg; break;
        case 'c': channel = optarg; break;
        case 'n': count = strtoull(optarg, NULL, 10); break;
        case 'i': interval_ms = strtoull(optarg, NULL, 10); break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "producer: unexpected argument \"%s\" (the socket is --socket PATH)\n%s", argv[optind], usage);
        return 2;
    }

    tb_client *client;
    tb_producer *producer;
    check(tb_client_connect(socket, "producer.c", &client), "connect");
    check(tb_producer_open(client, channel, &producer), "open producer");
    printf("producer: publishing %llu frames of %dx%d float32 on %s\n", count, ROWS, COLS, channel);
    fflush(stdout);

    const size_t shape[2] = {ROWS, COLS};
    for (unsigned long long frame = 0; frame < count; frame++) {
        tb_tensor *t;
        /* Wait up to 1 s for a free slot if every slot is still being read. */
        check(tb_loan_timeout(producer, TB_DTYPE_F32, 2, shape, 1000000000ull, &t), "loan");
        void *data;
        check(tb_tensor_data(t, &data, NULL), "data");
        float *x = data; /* written straight into the slot: no copy */
        for (int i = 0; i < ROWS * COLS; i++)
            x[i] = (float)(frame * 100 + (unsigned long long)i);

        uint8_t header[12];
        put_le(header, frame, 8);  /* frame counter */
        put_le(header + 8, 0, 4);  /* stages so far */
        check(tb_tensor_set_user_header(t, header, sizeof header), "user header");

        uint32_t delivered;
        check(tb_publish(t, &delivered), "publish"); /* t is gone now; readers hold the slot */
        printf("producer: frame %llu delivered to %u\n", frame, delivered);
        fflush(stdout);
        struct timespec pause = {(time_t)(interval_ms / 1000), (long)(interval_ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
    }
    printf("producer: published %llu frames\n", count);
    check(tb_producer_close(producer), "close producer");
    check(tb_client_close(client), "close client");
    return 0;
}
