/*
 * stage: takes each example frame exclusively, doubles every value in place
 * (in the shared-memory slot itself, no copy), adds one to the stage count in
 * the user header and forwards the very same slot.
 *
 * Input: the frames of examples/{rust,python,c}/producer.*, or of another
 * stage; output: what examples/{rust,python,c}/consumer.* checks. A stage's
 * input must be a workqueue channel (each frame goes to one worker).
 *
 *   tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
 *   make -C bindings/c examples
 *   target/tensorbus-c/consumer --socket /tmp/tb-ex.sock &
 *   target/tensorbus-c/stage --socket /tmp/tb-ex.sock [--input frames/raw] [--output frames/doubled] &
 *   target/tensorbus-c/producer --socket /tmp/tb-ex.sock
 *
 * Options: --input NAME (default frames/raw), --output NAME (default
 * frames/doubled), --count N frames to forward (default 10), --timeout S to
 * wait for each one (default 10).
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <tensorbus.h>

/* Prints the failed call and why, and exits. */
static void check(tb_status s, const char *what) {
    if (s != TB_OK) {
        fprintf(stderr, "stage: %s: %s: %s\n", what, tb_status_str((int)s),
                tb_last_error_message());
        exit(1);
    }
}

/* Little-endian loads and stores, whatever the host's byte order. */
static uint64_t get_le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static void put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static const char usage[] =
    "usage: stage [--socket PATH] [--input NAME] [--output NAME] [--count N] [--timeout S]\n"
    "Takes N frames (default 10) of a workqueue channel (default frames/raw) exclusively,\n"
    "doubles every value in place and forwards the same slot (default frames/doubled);\n"
    "waits at most S seconds per frame (default 10). Broker config: examples/tensorbus.toml.\n";

int main(int argc, char **argv) {
    const char *socket = NULL; /* NULL: $TENSORBUS_SOCKET or the default */
    const char *input = "frames/raw", *output = "frames/doubled";
    unsigned long long count = 10;
    double timeout_s = 10;
    static const struct option options[] = {
        {"socket", required_argument, NULL, 's'},
        {"input", required_argument, NULL, 'i'},
        {"output", required_argument, NULL, 'o'},
        {"count", required_argument, NULL, 'n'},
        {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    for (int opt; (opt = getopt_long(argc, argv, "h", options, NULL)) != -1;) {
        switch (opt) {
        case 's': socket = optarg; break;
        case 'i': input = optarg; break;
        case 'o': output = optarg; break;
        case 'n': count = strtoull(optarg, NULL, 10); break;
        case 't': timeout_s = strtod(optarg, NULL); break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "stage: unexpected argument \"%s\" (the socket is --socket PATH)\n%s", argv[optind], usage);
        return 2;
    }

    tb_client *client;
    tb_stage *stage;
    check(tb_client_connect(socket, "stage.c", &client), "connect");
    check(tb_stage_open(client, input, output, &stage), "open stage");
    printf("stage: %s -> %s\n", input, output);
    fflush(stdout);

    for (unsigned long long n = 0; n < count; n++) {
        tb_tensor *t;
        check(tb_recv_mut(stage, (uint64_t)(timeout_s * 1e9), &t), "recv_mut");
        void *data;
        size_t nbytes;
        check(tb_tensor_data(t, &data, &nbytes), "data"); /* writable: we hold it alone */
        float *x = data;
        for (size_t i = 0; i < nbytes / sizeof(float); i++)
            x[i] *= 2.0f;

        const uint8_t *old;
        size_t old_len;
        check(tb_tensor_user_header(t, &old, &old_len), "user header");
        if (old_len < 12) {
            fprintf(stderr, "stage: user header has %zu bytes, want 12\n", old_len);
            exit(1);
        }
        uint8_t header[12];
        uint64_t frame = get_le(old, 8);
        put_le(header, frame, 8);
        put_le(header + 8, get_le(old + 8, 4) + 1, 4); /* one more stage */
        check(tb_tensor_set_user_header(t, header, sizeof header), "set user header");

        uint32_t delivered;
        check(tb_forward(t, &delivered), "forward"); /* the same slot goes on to the output */
        printf("stage: frame %llu doubled, forwarded to %u\n", (unsigned long long)frame, delivered);
        fflush(stdout);
    }
    printf("stage: %llu frames forwarded\n", count);
    check(tb_stage_close(stage), "close stage");
    check(tb_client_close(client), "close client");
    return 0;
}
