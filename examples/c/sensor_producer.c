/*
 * sensor_producer: a C sensor publishing 64 channels x 1024 float32 samples
 * (an IMU or lidar sweep) at a fixed rate, written straight into shared memory.
 *
 *   tensorbus broker --config examples/c/sensor.toml --socket /tmp/tb-sensor.sock &
 *   sensor_producer /tmp/tb-sensor.sock [SWEEPS [RATE_HZ]]      (default 100 sweeps at 50 Hz)
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tensorbus.h>

enum { CHANNELS = 64, SAMPLES = 1024 };

/* Prints the failed call and why, and exits. */
static void check(tb_status s, const char *what) {
    if (s != TB_OK) {
        fprintf(stderr, "sensor_producer: %s: %s: %s\n", what, tb_status_str((int)s),
                tb_last_error_message());
        exit(1);
    }
}

static const char usage[] =
    "usage: sensor_producer [SOCKET [SWEEPS [RATE_HZ]]]\n"
    "Publishes SWEEPS sweeps (default 100) of 64 channels x 1024 float32 samples on sensor/imu\n"
    "at RATE_HZ (default 50). SOCKET: default $TENSORBUS_SOCKET, then the default socket path.\n"
    "Broker config: examples/c/sensor.toml.\n";

int main(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        fputs(usage, stdout);
        return 0;
    }
    if (argc > 4 || (argc > 1 && argv[1][0] == '-')) {
        fputs(usage, stderr);
        return 2;
    }
    const char *socket = argc > 1 ? argv[1] : NULL; /* NULL: $TENSORBUS_SOCKET or the default */
    long sweeps = argc > 2 ? strtol(argv[2], NULL, 10) : 100;
    double rate = argc > 3 ? strtod(argv[3], NULL) : 50.0;

    tb_client *client;
    tb_producer *producer;
    check(tb_client_connect(socket, "sensor_producer", &client), "connect");
    check(tb_producer_open(client, "sensor/imu", &producer), "open sensor/imu");

    const size_t shape[2] = {CHANNELS, SAMPLES};
    const long period_ns = (long)(1e9 / rate);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    unsigned delivered_total = 0;

    for (long sweep = 0; sweep < sweeps; sweep++) {
        tb_tensor *t;
        /* Wait up to 1 s for a free slot if every slot is still being read. */
        check(tb_loan_timeout(producer, TB_DTYPE_F32, 2, shape, 1000000000ull, &t), "loan");
        void *data;
        check(tb_tensor_data(t, &data, NULL), "data");
        float *samples = data; /* [channel][sample], written in place: no copy */
        for (int ch = 0; ch < CHANNELS; ch++)
            for (int i = 0; i < SAMPLES; i++)
                samples[ch * SAMPLES + i] = (float)ch + (float)((i + sweep) % 100) * 0.01f;

        /* Our own metadata: the sweep number and the channel count. */
        unsigned char header[12];
        uint64_t id = (uint64_t)sweep;
        uint32_t channels = CHANNELS;
        memcpy(header, &id, 8);
        memcpy(header + 8, &channels, 4);
        check(tb_tensor_set_user_header(t, header, sizeof header), "user header");

        uint32_t delivered;
        check(tb_publish(t, &delivered), "publish"); /* t is gone now */
        delivered_total += delivered;

        next.tv_nsec += period_ns;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    printf("sensor_producer: published %ld sweeps of %dx%d float32 (%u deliveries)\n", sweeps,
           CHANNELS, SAMPLES, delivered_total);
    check(tb_producer_close(producer), "close producer");
    check(tb_client_close(client), "close client");
    return 0;
}
