"""The control plane through the Python binding (issue 12).

* 12.5: a request to a broker stopped (SIGSTOP) past the request timeout
  raises tb.Timeout; after SIGCONT the next request gets its own reply and
  the broker holds no subscriber for the consumer that failed. Before the
  fix every later reply was the previous request's ("unexpected reply
  Consumer{...}") and a phantom subscriber stayed.
* 12.6: an open in a process with no free file descriptor raises
  tb.LimitReached naming EMFILE and leaves nothing at the broker. Before
  the fix: BrokerUnavailable "control data truncated: more than 32
  descriptors attached", and a phantom `block` subscriber.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import tensorbus as tb
from test_cli_broker import cli_broker  # noqa: F401  (a fixture)


def subscribers(client, channel):
    for c in client.stat()["channels"]:
        if c["name"] == channel:
            return len(c["subscribers"])
    raise KeyError(channel)


def test_a_request_to_a_stopped_broker_times_out_and_leaves_nothing(cli_broker, monkeypatch):  # noqa: F811
    proc, sock, observer = cli_broker
    # Read at connect; keeps the test short (the default is 10 s).
    monkeypatch.setenv("TENSORBUS_REQUEST_TIMEOUT_MS", "300")
    with tb.Client(sock, name="frozen") as client:
        live = client.consumer("bcast")
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(tb.Timeout, match="did not answer within 300ms"):
                client.consumer("bcast")
            time.sleep(0.5)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        stat = client.stat()  # its own reply, not the consumer's
        chans = {c["name"]: c for c in stat["channels"]}
        assert len(chans["bcast"]["subscribers"]) == 1  # the live consumer only
        second = client.consumer("bcast")
        assert subscribers(observer, "bcast") == 2
        second.close()
        live.close()
        assert subscribers(client, "bcast") == 0


CHILD = textwrap.dedent(
    """
    import os, resource, sys
    import tensorbus as tb

    client = tb.Client(sys.argv[1], name="emfile")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    results = []
    for open_ in (client.consumer, client.producer):
        try:
            open_("bcast")
            results.append("opened")
        except tb.TensorbusError as e:
            results.append(f"{type(e).__name__}: {e}")
    for fd in fillers:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for r in results:
        print(r)
    chan = [c for c in client.stat()["channels"] if c["name"] == "bcast"][0]
    print("left", chan["producers"], len(chan["subscribers"]))
    client.consumer("bcast").close()
    print("ok")
    """
)


def test_an_open_without_a_free_descriptor_reports_emfile(broker, client):
    # A subprocess: the embedded broker runs in this process and must keep
    # its descriptors.
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(broker.socket)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout
    for line in lines[:2]:
        assert line.startswith("LimitReached: no free file descriptor in this process (EMFILE)"), line
        assert 'channel "bcast"' in line and "ulimit -n" in line, line
    assert lines[2] == "left 0 0"
    assert lines[3] == "ok"
    assert subscribers(client, "bcast") == 0
