/*
 * sensor_consumer: receives sensor sweeps from sensor_producer as read-only views of
 * the producer's shared memory and prints per-sweep statistics.
 *
 *   sensor_consumer /tmp/tb-sensor.sock [COUNT]     (stops after COUNT sweeps or 2 s of silence)
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tensorbus.h>

static void check(tb_status s, const char *what) {
    if (s != TB_OK) {
        fprintf(stderr, "sensor_consumer: %s: %s: %s\n", what, tb_status_str((int)s),
                tb_last_error_message());
        exit(1);
    }
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static const char usage[] =
    "usage: sensor_consumer [SOCKET [COUNT]]\n"
    "Receives sweeps of sensor/imu (from sensor_producer) and prints statistics of each; stops\n"
    "after COUNT sweeps (default 100) or 2 s without one. SOCKET: default $TENSORBUS_SOCKET,\n"
    "then the default socket path. Broker config: examples/c/sensor.toml.\n";

int main(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        fputs(usage, stdout);
        return 0;
    }
    if (argc > 3 || (argc > 1 && argv[1][0] == '-')) {
        fputs(usage, stderr);
        return 2;
    }
    const char *socket = argc > 1 ? argv[1] : NULL;
    long count = argc > 2 ? strtol(argv[2], NULL, 10) : 100;

    tb_client *client;
    tb_consumer *consumer;
    check(tb_client_connect(socket, "sensor_consumer", &client), "connect");
    /* Real time: keep the 4 newest sweeps, drop older ones if we fall behind. */
    check(tb_consumer_open(client, "sensor/imu", TB_POLICY_DROP_OLDEST, 4, &consumer), "open");

    long received = 0;
    while (received < count) {
        tb_tensor *t;
        tb_status s = tb_recv(consumer, 2000000000ull, &t);
        if (s == TB_ERR_TIMEOUT)
            break;
        check(s, "recv");
        received++;

        size_t ndim, shape[TB_MAX_DIMS];
        uint64_t seq, stamp;
        const void *data;
        const uint8_t *header;
        size_t header_len;
        check(tb_tensor_shape(t, &ndim, shape, TB_MAX_DIMS), "shape");
        check(tb_tensor_seq(t, &seq), "seq");
        check(tb_tensor_timestamp_ns(t, &stamp), "timestamp");
        check(tb_tensor_const_data(t, &data, NULL), "data");
        check(tb_tensor_user_header(t, &header, &header_len), "user header");

        const float *samples = data; /* read-only: the producer's own bytes */
        double mean = 0;
        for (size_t i = 0; i < shape[1]; i++)
            mean += samples[i];
        mean /= (double)shape[1];
        uint64_t sweep = 0;
        if (header_len >= 8)
            memcpy(&sweep, header, 8);
        printf("seq %llu sweep %llu shape [%zu, %zu] channel0 mean %.3f latency %llu us\n",
               (unsigned long long)seq, (unsigned long long)sweep, shape[0], shape[1], mean,
               (unsigned long long)((now_ns() - stamp) / 1000));
        check(tb_release(t), "release"); /* the slot can be reused now */
    }
    printf("sensor_consumer: received %ld sweeps\n", received);
    check(tb_consumer_close(consumer), "close consumer");
    check(tb_client_close(client), "close client");
    return 0;
}
