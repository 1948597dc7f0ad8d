#!/usr/bin/env python3
"""The hostile side of bench/soak.sh (stdlib only), run next to `lab loadtest`.

For --duration seconds it keeps, against one `lab serve`:
- 200 idle connections open (reopened when the server closes them at --idle-timeout),
- 20 half-sent request heads trickling a byte a second (closed at --header-timeout),
- 8 slow readers: streams read 256 bytes every 0.5 s through a small receive buffer,
- a client every 2 s that starts a stream and leaves after its first tokens;
and writes what each saw to OUT/clients.json.
"""

import argparse
import json
import socket
import threading
import time

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--duration", type=float, required=True)
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
a = p.parse_args()

stop = time.time() + a.duration
lock = threading.Lock()
seen = {
    "idle_closed_by_server": 0,
    "idle_open_max": 0,
    "trickle_closed_by_server": 0,
    "slow_reader_streams": {"done": 0, "error_event": 0, "http_503": 0, "other": 0},
    "disconnects": {"left_mid_stream": 0, "http_503": 0, "other": 0},
    "other_details": [],
}


def other(where, detail):
    with lock:
        seen[where]["other"] += 1
        if len(seen["other_details"]) < 20:
            seen["other_details"].append(f"{where}: {detail}"[:300])


def bump(*path):
    with lock:
        d = seen
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] += 1


def connect(rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect((a.host, a.port))
    return s


def request(body):
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {a.host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def chat(i, max_tokens):
    return {
        "model": a.model,
        "messages": [{"role": "user", "content": f"Soak client {i}: tell me a long story about queues."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def idle_pool(n=200):
    socks = []
    while time.time() < stop:
        while len(socks) < n:
            try:
                socks.append(connect())
            except OSError:
                time.sleep(0.1)
                break
        with lock:
            seen["idle_open_max"] = max(seen["idle_open_max"], len(socks))
        alive = []
        for s in socks:
            s.setblocking(False)
            try:
                closed = s.recv(1) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                bump("idle_closed_by_server")
                s.close()
            else:
                alive.append(s)
        socks = alive
        time.sleep(1)
    for s in socks:
        s.close()


def trickler():
    while time.time() < stop:
        try:
            s = connect()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            while time.time() < stop:
                s.sendall(b"x")
                time.sleep(1)
        except OSError:
            bump("trickle_closed_by_server")
        time.sleep(0.2)


def slow_reader(i):
    while time.time() < stop:
        got = b""
        try:
            s = connect(rcvbuf=4096)
            s.settimeout(60)
            s.sendall(request(chat(i, 64)))
            while True:
                chunk = s.recv(256)
                if not chunk:
                    break
                got += chunk
                # A stream ends with [DONE]; a refusal (503 + Retry-After) is a whole response
                # on a kept-alive connection: stop reading once its head is in.
                if b"data: [DONE]" in got or (not got.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in got):
                    break
                time.sleep(0.5)
            s.close()
            if got.startswith(b"HTTP/1.1 503"):
                bump("slow_reader_streams", "http_503")
                time.sleep(1)
            elif b'"error"' in got:
                bump("slow_reader_streams", "error_event")
            elif b"data: [DONE]" in got:
                bump("slow_reader_streams", "done")
            else:
                other("slow_reader_streams", f"{len(got)} bytes, ends {got[-120:]!r}")
        except OSError as e:
            other("slow_reader_streams", f"{e!r} after {len(got)} bytes, ends {got[-120:]!r}")


def leaver():
    i = 0
    while time.time() < stop:
        i += 1
        try:
            s = connect()
            s.settimeout(120)
            s.sendall(request(chat(1000 + i, 64)))
            got = b""
            while b'"content":"' not in got.replace(b'"content":""', b""):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
                if got.startswith(b"HTTP/1.1 503"):
                    break
            s.close()  # mid-stream
            if got.startswith(b"HTTP/1.1 503"):
                bump("disconnects", "http_503")
            elif got.startswith(b"HTTP/1.1 200"):
                bump("disconnects", "left_mid_stream")
            else:
                other("disconnects", f"{len(got)} bytes, ends {got[-120:]!r}")
        except OSError as e:
            other("disconnects", repr(e))
        time.sleep(2)


threads = [threading.Thread(target=idle_pool)]
threads += [threading.Thread(target=trickler) for _ in range(20)]
threads += [threading.Thread(target=slow_reader, args=(i,)) for i in range(8)]
threads += [threading.Thread(target=leaver)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with open(f"{a.out}/clients.json", "w") as f:
    json.dump(seen, f, indent=1)
