"""The router's client ports under garbage, as a process over real sockets: malformed HTTP
(request lines, headers, framing, sizes) over TLS, and TLS handshakes with garbage (random
bytes, cut-off and corrupted ClientHellos, silent connections). The router must answer
well-formed requests with a 4xx and an OpenAI error body, never a 5xx, drop what is not
HTTP or TLS, keep serving real clients throughout, and end with the memory it had after a
warm-up (its resident set may not grow by more than a few MiB). Deterministic (seeded).

  python tests/openai/fuzz_front.py --bin-dir target/debug [--cases 10000]
"""

import argparse
import json
import pathlib
import random
import socket
import ssl
import subprocess
import sys
import time

import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/openai"))
from check_client import MODEL, check, free_port, wait_ready  # noqa: E402
from check_tls import CA, FIXTURES, trusting_ca  # noqa: E402

try:
    import httpx2 as httpx  # what openai 3.x is built on
except ImportError:
    import httpx

GROWTH_LIMIT_KIB = 16 * 1024
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/", "/v1/chat/completions/x",
         "/%00", "/" + "a" * 3000, "/v1/../v1/models", "*"]
METHODS = ["POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD", "BREW", ""]


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("FAILED: no VmRSS for the router")


def body(rng):
    """A body that is wrong in one of many ways, or right but odd."""
    valid = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    kind = rng.randrange(9)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 4096))
    if kind == 1:
        return json.dumps(valid).encode()[: rng.randrange(1, 60)]
    if kind == 2:
        depth = rng.choice([10, 200, 5000])
        return ("[" * depth + "]" * depth).encode()
    if kind == 3:  # past the body limit, or just short of it
        size = rng.choice([3 << 20, 64 << 10])
        return json.dumps({**valid, "messages": [{"role": "user", "content": "x" * size}]}).encode()
    if kind == 4:
        return b"\xff\xfe" + json.dumps(valid).encode()
    if kind == 5:
        return json.dumps({**valid, rng.choice(["n", "max_tokens", "temperature", "stop", "seed"]):
                           rng.choice([-1, 1e309, "x", [None], {"a": []}, 2**70])}).encode().replace(b"Infinity", b"1e999")
    if kind == 6:
        return b""
    if kind == 7:
        return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * rng.randrange(1, 2000),
                           "max_tokens": 1}).encode()
    return json.dumps({**valid, "stream": rng.random() < 0.5}).encode()


def request(rng):
    """Raw request bytes, and whether they are well-formed HTTP/1.1 (so an answer is due)."""
    method, path, payload = rng.choice(METHODS), rng.choice(PATHS), body(rng)
    # One request per connection: the router closes it after answering.
    headers = [("Host", "localhost"), ("Connection", "close"),
               ("Content-Type", rng.choice(["application/json", "text/plain", "", "\x7f"]))]
    well_formed = bool(method) and method != "HEAD" and path != "*" and "\x7f" not in headers[2][1]
    framing = rng.randrange(6)
    if framing == 0:
        headers.append(("Content-Length", str(len(payload))))
    elif framing == 1:  # a length that lies (short): the rest is the next "request"
        headers.append(("Content-Length", str(max(0, len(payload) - rng.randrange(1, 50)))))
        well_formed = False
    elif framing == 2:  # chunked, sometimes broken
        size = f"{len(payload):x}" if rng.random() < 0.7 else "zz"
        payload = f"{size}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
        headers.append(("Transfer-Encoding", "chunked"))
        well_formed = well_formed and size != "zz"
    elif framing == 3:  # both: a request smuggler's favourite
        headers += [("Content-Length", str(len(payload))), ("Transfer-Encoding", "chunked")]
        well_formed = False
    elif framing == 4:  # headers too many or too large
        headers += [(f"X-{i}", "v" * rng.choice([10, 9000])) for i in range(rng.choice([5, 150]))]
        well_formed = False
    else:
        headers.append(("Content-Length", str(len(payload))))
        headers.append(("Authorization", rng.choice(["Bearer", "Bearer \x01", "Basic abc", "Bearer " + "k" * 5000])))
        well_formed = well_formed and "\x01" not in headers[-1][1]
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + payload, well_formed


def exchange(port, data, timeout=20):
    """Sends `data` over TLS and reads the answer until the router closes the connection."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with trusting_ca().wrap_socket(raw, server_hostname="localhost") as tls:
            try:
                tls.sendall(data)
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
            except (socket.timeout, ssl.SSLError, ConnectionResetError, BrokenPipeError):
                pass
    return b"".join(chunks)


def openai_error(answer):
    """Whether the answer's body is an OpenAI error object."""
    head, _, rest = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        return False
    try:
        return "message" in json.loads(rest)["error"]
    except (ValueError, KeyError, TypeError):
        return False


def client_hello():
    """The first bytes a real client sends, captured from a handshake into memory."""
    context = ssl.create_default_context(cafile=CA)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def garbage_handshake(port, rng, hello):
    """One connection that sends what no TLS client would, then hangs up."""
    kind = rng.randrange(4)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            if kind == 0:
                raw.sendall(rng.randbytes(rng.randrange(1, 8192)))
            elif kind == 1:
                raw.sendall(hello[: rng.randrange(1, len(hello))])
            elif kind == 2:
                corrupted = bytearray(hello)
                for _ in range(rng.randrange(1, 20)):
                    corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
                raw.sendall(bytes(corrupted))
            else:
                raw.sendall(hello + rng.randbytes(rng.randrange(1, 4096)))
    except OSError:
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/debug"))
    parser.add_argument("--cases", type=int, default=10000)
    args = parser.parse_args()
    bin_dir = pathlib.Path(args.bin_dir)
    rng = random.Random(20261206)
    worker_port, grpc_port, http_port = free_port(), free_port(), free_port()
    procs = [
        subprocess.Popen([bin_dir / "deepseek-worker", "serve", "--listen", f"127.0.0.1:{worker_port}"], cwd=ROOT),
        subprocess.Popen([bin_dir / "deepseek-router", "--grpc-listen", f"127.0.0.1:{grpc_port}",
                          "--http-listen", f"127.0.0.1:{http_port}", "--metrics-listen", "",
                          "--backend", f"pool=cpu,addr=127.0.0.1:{worker_port}", "--health-interval-ms", "100",
                          "--tls-cert", str(FIXTURES / "router-a.crt"), "--tls-key", str(FIXTURES / "router-a.key")],
                         cwd=ROOT, stderr=subprocess.DEVNULL),
    ]
    router = procs[1]
    try:
        client = openai.OpenAI(base_url=f"https://localhost:{http_port}/v1", api_key="none", max_retries=0,
                               http_client=httpx.Client(verify=trusting_ca()))
        wait_ready(client)

        def still_serves():
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=1)
            return reply.usage.completion_tokens == 1

        warm_up = [request(rng) for _ in range(300)]
        for data, _ in warm_up:
            exchange(http_port, data)
        baseline = rss_kib(router.pid)
        answered, dropped, bad = 0, 0, []
        started = time.time()
        for i in range(args.cases):
            data, well_formed = request(rng)
            answer = exchange(http_port, data)
            if not answer:
                dropped += 1
                continue
            status_line = answer.split(b"\r\n", 1)[0]
            status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
            answered += 1
            if status >= 500 or (well_formed and status >= 400 and not openai_error(answer)):
                bad.append((i, status_line, data[:120], answer[-200:]))
            if i % 1000 == 999 and not still_serves():
                bad.append((i, "a real client failed", b""))
        kinds = sorted({(b[1], b[2].split(b"\r\n", 1)[0][:60], b[3][-120:]) for b in bad})
        check(not bad, f"{args.cases} malformed HTTP requests over TLS: no 5xx, and an OpenAI error for every "
                       f"4xx to well-formed HTTP ({answered} answered, {dropped} dropped as not HTTP; "
                       f"{time.time() - started:.0f} s; {len(bad)} bad, of these kinds: {kinds[:8]})")

        hello = client_hello()
        for _ in range(2000):
            garbage_handshake(http_port, rng, hello)
            garbage_handshake(grpc_port, rng, hello)
        check(router.poll() is None and still_serves(), "4,000 garbage TLS handshakes: still serving")
        # Connections that never say a word hold up no one, and go at the handshake deadline.
        silent = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(200)]
        check(still_serves(), "200 silent connections open: still serving")
        time.sleep(11)
        closed = 0
        for connection in silent:
            connection.settimeout(2)
            try:
                closed += connection.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except socket.timeout:
                pass
            connection.close()
        check(closed == len(silent), f"the router hung up on the silent connections ({closed} of 200)")
        grown = rss_kib(router.pid) - baseline
        check(grown < GROWTH_LIMIT_KIB, f"memory flat: the router's resident set grew {grown} KiB after warm-up")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
