#!/usr/bin/env python3
"""The HTTP client of scripts/netns-cluster.sh (standard library only: no venv needed).

It runs inside the coordinator's network namespace and talks to the coordinator's OpenAI API:

  ready URL STATUS TIMEOUT_S        wait until GET /ready answers STATUS (200 or 503)
  text URL PROMPT MAX_TOKENS        print the greedy completion of PROMPT
  speed URL SENTENCES DECODE RUNS   prefill tokens/s and decode ms/token as JSON (medians)
  heal URL DOWN_CMD UP_CMD PROMPT   take a link down with DOWN_CMD while requests run, bring it
                                    back with UP_CMD; the timings and answers as JSON
  sink HOST PORT                    accept one TCP connection, read it to the end (prints
                                    "listening" first)
  push HOST PORT MIB                send MIB MiB over raw TCP to a sink: MiB/s on stdout
  table ROWS_TSV                    print rows in gemma-bench's table format

Every wait has a deadline; a missed one exits non-zero naming what it waited for.
"""

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

# The prompt of the speed runs: an English sentence repeated, so its length in tokens is
# fixed by the repeat count and the same on every run and plan.
SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank. "
# The requests in flight when a link goes down: long enough never to finish first (nothing
# decodes while the link is down), short enough for the KV pool and the tiny model's context.
IN_FLIGHT_TOKENS = 2000
OUTAGE_AFTER_503_S = 5.0


def die(msg):
    print(f"netns-client: error: {msg}", file=sys.stderr)
    sys.exit(1)


def connect(url, timeout):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def request(url, method, path, body=None, timeout=30.0):
    """One request on its own connection: (status, parsed JSON body or text)."""
    conn = connect(url, timeout)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        raw = resp.read().decode("utf-8", "replace")
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


def ready_status(url):
    try:
        return request(url, "GET", "/ready", timeout=2.0)
    except OSError as e:
        return None, str(e)


def wait_ready(url, want, timeout_s):
    """Polls /ready every 50 ms until it answers `want`: (seconds waited, body)."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout_s:
        status, body = ready_status(url)
        last = (status, body)
        if status == want:
            return time.monotonic() - start, body
        time.sleep(0.05)
    die(f"/ready did not answer {want} within {timeout_s} s (last: {last})")


def greedy_body(prompt, max_tokens, stream=False):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, ignore_eos=True, stream_options={"include_usage": True})
    return body


def text(url, prompt, max_tokens):
    status, body = request(url, "POST", "/v1/completions", greedy_body(prompt, max_tokens), 120)
    if status != 200:
        die(f"completion answered {status}: {body}")
    return body["choices"][0]["text"]


def stream_events(url, body, timeout):
    """Yields (arrival time, parsed event) for each SSE data line until [DONE]."""
    conn = connect(url, timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            yield time.monotonic(), {"status": resp.status, "error": resp.read().decode()}
            return
        while True:
            line = resp.readline()
            if not line:
                return
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield time.monotonic(), json.loads(data)
    finally:
        conn.close()


def one_speed_run(url, prompt, decode_tokens):
    """Prefill tokens/s (prompt tokens over the time to the first token) and decode ms/token
    (first to last token over the tokens between) of one greedy streamed request."""
    start = time.monotonic()
    arrivals, usage = [], None
    for t, ev in stream_events(url, greedy_body(prompt, decode_tokens, stream=True), 300):
        if "error" in ev:
            die(f"speed run failed: {ev}")
        if ev.get("choices"):
            arrivals.append(t)
        if ev.get("usage"):
            usage = ev["usage"]
    if usage is None or len(arrivals) < 2:
        die(f"speed run got {len(arrivals)} token events and usage {usage}")
    n = usage["completion_tokens"]
    if n != decode_tokens:
        die(f"asked {decode_tokens} tokens with ignore_eos, the server counted {n}")
    prefill = usage["prompt_tokens"] / (arrivals[0] - start)
    decode_ms = (arrivals[-1] - arrivals[0]) * 1000 / (len(arrivals) - 1)
    return usage["prompt_tokens"], prefill, decode_ms


def speed(url, sentences, decode_tokens, runs):
    prompt = SENTENCE * sentences
    one_speed_run(url, prompt, 8)  # warm-up: first-touch of the KV cache and the weights
    prefills, decodes, prompt_tokens = [], [], 0
    for _ in range(runs):
        prompt_tokens, p, d = one_speed_run(url, prompt, decode_tokens)
        prefills.append(p)
        decodes.append(d)
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_tok_s": statistics.median(prefills),
        "decode_ms_per_token": statistics.median(decodes),
        "prefill_runs": prefills,
        "decode_runs": decodes,
    }


class InFlight(threading.Thread):
    """A long greedy request running while the link goes down: how and when it ended."""

    def __init__(self, url, prompt, stream):
        super().__init__(daemon=True)
        self.url, self.prompt, self.stream = url, prompt, stream
        self.tokens = 0
        self.outcome = None
        self.ended = None

    def run(self):
        try:
            if self.stream:
                self.run_stream()
            else:
                status, body = request(self.url, "POST", "/v1/completions",
                                       dict(greedy_body(self.prompt, IN_FLIGHT_TOKENS), ignore_eos=True), 120)
                self.outcome = {"status": status, "body": body}
        except OSError as e:
            self.outcome = {"transport_error": str(e)}
        self.ended = time.monotonic()

    def run_stream(self):
        body = greedy_body(self.prompt, IN_FLIGHT_TOKENS, stream=True)
        for _, ev in stream_events(self.url, body, 120):
            if "error" in ev:
                self.outcome = {"stream_error": ev["error"], "after_tokens": self.tokens}
                return
            if ev.get("choices"):
                self.tokens += 1
        self.outcome = {"stream_ended_without_error": True, "tokens": self.tokens}


def heal(url, down_cmd, up_cmd, prompt, timeout_s=60.0):
    before = text(url, prompt, 24)
    flights = [InFlight(url, prompt, stream=True), InFlight(url, prompt, stream=False)]
    for f in flights:
        f.start()
    # Both requests are decoding once the stream has produced tokens.
    deadline = time.monotonic() + 30
    while flights[0].tokens < 4:
        if time.monotonic() > deadline or flights[0].outcome is not None:
            die(f"the in-flight stream did not start decoding: {flights[0].outcome}")
        time.sleep(0.01)
    subprocess.run(down_cmd, shell=True, check=True, timeout=10)
    down_at = time.monotonic()
    to_503, ready_body = wait_ready(url, 503, timeout_s)
    for f in flights:
        f.join(timeout=max(1.0, timeout_s - (time.monotonic() - down_at)))
        if f.is_alive():
            die(f"an in-flight request was still running {timeout_s} s after the link went down")
    status, refused = request(url, "POST", "/v1/completions", greedy_body(prompt, 4), 10)
    # The outage lasts a while past detection, as a real one would: the coordinator's re-dials
    # back off to their 2 s ceiling before the link returns.
    time.sleep(OUTAGE_AFTER_503_S)
    subprocess.run(up_cmd, shell=True, check=True, timeout=10)
    up_at = time.monotonic()
    to_200, _ = wait_ready(url, 200, timeout_s)
    after = text(url, prompt, 24)
    return {
        "text_before": before,
        "text_after": after,
        "same_text": before == after,
        "down_to_ready_503_s": round(to_503, 3),
        "ready_503_body": ready_body,
        "in_flight": [
            {"stream": f.stream, "ended_after_down_s": round(f.ended - down_at, 3), **f.outcome}
            for f in flights
        ],
        "new_request_while_down": {"status": status, "body": refused},
        "up_to_ready_200_s": round(to_200, 3),
    }


def sink(host, port):
    """The receiving end of the raw link check: the floor the shaped link leaves any TCP flow."""
    listener = socket.create_server((host, port))
    listener.settimeout(60)
    print("listening", flush=True)
    conn, _ = listener.accept()
    conn.settimeout(60)
    with conn:
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"k")  # the sender's clock stops when everything has arrived


def push(host, port, mib):
    chunk = b"x" * (1 << 20)
    with socket.create_connection((host, port), timeout=60) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        for _ in range(mib):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(1) != b"k":
            die("the sink closed before acknowledging the transfer")
        return mib / (time.monotonic() - start)


def table(path):
    """Rows: figure, value, unit, reference name, reference value, threads (tab-separated).
    Printed as gemma-bench prints its table; a value of "-" is a row that did not run."""
    print()
    print(f"| {'figure':<46} | {'value':>12} | {'reference (same run)':<30} | "
          f"{'reference':>12} | {'ratio':>6} | {'threads':<10} |")
    print(f"|{'':-<48}|{'':->14}|{'':-<32}|{'':->14}|{'':->8}|{'':-<12}|")
    with open(path) as f:
        for line in f:
            figure, value, unit, ref_name, ref_value, threads = line.rstrip("\n").split("\t")
            has = value != "-" and ref_value != "-"
            v = f"{float(value):.1f} {unit}" if value != "-" else "-"
            rv = f"{float(ref_value):.1f} {unit}" if ref_value != "-" else "-"
            ratio = f"{float(value) / float(ref_value):.2f}" if has else "-"
            print(f"| {figure:<46} | {v:>12} | {ref_name:<30} | {rv:>12} | {ratio:>6} | "
                  f"{threads:<10} |")


def main(argv):
    if len(argv) < 2:
        die(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "ready" and len(args) == 3:
        waited, _ = wait_ready(args[0], int(args[1]), float(args[2]))
        print(f"{waited:.3f}")
    elif cmd == "text" and len(args) == 3:
        print(json.dumps(text(args[0], args[1], int(args[2]))))
    elif cmd == "speed" and len(args) == 4:
        print(json.dumps(speed(args[0], int(args[1]), int(args[2]), int(args[3]))))
    elif cmd == "heal" and len(args) == 4:
        print(json.dumps(heal(*args), indent=1))
    elif cmd == "sink" and len(args) == 2:
        sink(args[0], int(args[1]))
    elif cmd == "push" and len(args) == 3:
        print(f"{push(args[0], int(args[1]), int(args[2])):.1f}")
    elif cmd == "table" and len(args) == 1:
        table(args[0])
    else:
        die(f"unknown command or wrong arguments: {argv[1:]}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
