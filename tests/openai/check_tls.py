"""TLS with real clients and processes.

The router's client ports: the official OpenAI client over HTTPS and a gRPC client over TLS,
both trusting a test CA; plaintext and untrusting clients refused; the probes' endpoints on
the metrics port; and the certificate rotated under load, as the kubelet rotates a mounted
Secret (an atomic swap of the `..data` link), with no failed request.

The router to the workers: mutual TLS with the deployment's CA. The worker refuses clients
without a certificate or with one from another CA; the router, with its own, serves; the
probes' plaintext health port answers and serves nothing else.

  python tests/openai/check_tls.py --bin-dir target/debug
"""

import argparse
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai

try:
    import httpx2 as httpx  # what openai 3.x is built on
except ImportError:
    import httpx

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import grpc_stubs  # noqa: E402
from check_client import MODEL, check, free_port, wait_ready  # noqa: E402  (this directory)

FIXTURES = ROOT / "tests/fixtures/tls"
CA = str(FIXTURES / "ca.crt")


def trusting_ca():
    return ssl.create_default_context(cafile=CA)


def generate_fails(pb_grpc, channel, request, code, what):
    """Checks that a Generate on `channel` fails with gRPC status `code`."""
    try:
        list(pb_grpc.InferenceStub(channel).Generate(request, timeout=10))
        check(False, what)
    except grpc.RpcError as e:
        check(e.code() == code, what)


def stop(procs):
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def secret_volume(root, name):
    """`root` laid out as the kubelet mounts a TLS Secret: tls.crt and tls.key are links
    into `..data`, itself a link to a directory holding the pair `name`."""
    data = root / f"..{name}"
    data.mkdir()
    shutil.copy(FIXTURES / f"{name}.crt", data / "tls.crt")
    shutil.copy(FIXTURES / f"{name}.key", data / "tls.key")
    link = root / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, root / "..data")
    for file in ["tls.crt", "tls.key"]:
        if not (root / file).is_symlink():
            (root / file).symlink_to(f"..data/{file}")


def served_name(port):
    """The common name of the certificate a fresh handshake presents."""
    context = trusting_ca()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(pair[0] for pair in tls.getpeercert()["subject"])
            return subject["commonName"]


class Load:
    """Chat completions, each over a new connection (so each is a new handshake), and gRPC
    generations on one channel, from their own threads, counting outcomes."""

    def __init__(self, http_url, grpc_addr, pb, pb_grpc):
        self.running, self.done, self.errors = True, 0, []
        self.lock = threading.Lock()
        self.http_url, self.grpc_addr, self.pb, self.pb_grpc = http_url, grpc_addr, pb, pb_grpc
        self.threads = [threading.Thread(target=self._http, daemon=True) for _ in range(2)]
        self.threads.append(threading.Thread(target=self._grpc, daemon=True))
        for thread in self.threads:
            thread.start()

    def _record(self, error=None):
        with self.lock:
            if error is None:
                self.done += 1
            else:
                self.errors.append(error)

    def _http(self):
        while self.running:
            fresh = httpx.Client(verify=trusting_ca(), limits=httpx.Limits(max_keepalive_connections=0))
            client = openai.OpenAI(base_url=self.http_url, api_key="none", max_retries=0, http_client=fresh)
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2)
                self._record()
            except Exception as e:  # noqa: BLE001 - every failure counts
                self._record(repr(e))
            finally:
                fresh.close()

    def _grpc(self):
        credentials = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(CA).read_bytes())
        with grpc.secure_channel(self.grpc_addr, credentials) as channel:
            stub = self.pb_grpc.InferenceStub(channel)
            while self.running:
                request = self.pb.GenerateRequest(text="Hi", stopping=self.pb.StoppingCriteria(max_new_tokens=2))
                try:
                    list(stub.Generate(request, timeout=60))
                    self._record()
                except grpc.RpcError as e:
                    self._record(repr(e))

    def stop(self):
        self.running = False
        for thread in self.threads:
            thread.join(timeout=120)


def check_mutual_tls(bin_dir, pb, pb_grpc):
    worker_port, health_port, grpc_port, http_port = free_port(), free_port(), free_port(), free_port()
    pair = ["--tls-cert", str(FIXTURES / "router-b.crt"), "--tls-key", str(FIXTURES / "router-b.key")]
    procs = [
        subprocess.Popen([bin_dir / "deepseek-worker", "serve", "--listen", f"127.0.0.1:{worker_port}",
                          "--health-listen", f"127.0.0.1:{health_port}", *pair, "--tls-client-ca", CA], cwd=ROOT),
        subprocess.Popen([bin_dir / "deepseek-router", "--grpc-listen", f"127.0.0.1:{grpc_port}",
                          "--http-listen", f"127.0.0.1:{http_port}", "--metrics-listen", "",
                          "--backend", f"pool=cpu,addr=127.0.0.1:{worker_port}", "--health-interval-ms", "100",
                          "--worker-tls-ca", CA, "--worker-tls-cert", str(FIXTURES / "router-a.crt"),
                          "--worker-tls-key", str(FIXTURES / "router-a.key")], cwd=ROOT),
    ]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)
        wait_ready(client)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, extra_body={"ignore_eos": True})
        check(reply.usage.completion_tokens == 3, "the router reaches the worker over mutual TLS")

        request = pb.GenerateRequest(text="Hi", stopping=pb.StoppingCriteria(max_new_tokens=1))
        ca = pathlib.Path(CA).read_bytes()
        for what, credentials in [
            ("no client certificate", grpc.ssl_channel_credentials(root_certificates=ca)),
            ("a client certificate from another CA", grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=(FIXTURES / "stranger.key").read_bytes(),
                certificate_chain=(FIXTURES / "stranger.crt").read_bytes())),
        ]:
            with grpc.secure_channel(f"localhost:{worker_port}", credentials) as channel:
                generate_fails(pb_grpc, channel, request, grpc.StatusCode.UNAVAILABLE, f"the worker refuses {what}")
        with grpc.insecure_channel(f"127.0.0.1:{worker_port}") as channel:
            generate_fails(pb_grpc, channel, request, grpc.StatusCode.UNAVAILABLE, "the worker refuses plaintext")

        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            answer = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
            check(answer == b"\x08\x01", "the plaintext health port answers SERVING (probes)")
            generate_fails(pb_grpc, channel, request, grpc.StatusCode.UNIMPLEMENTED, "the health port serves nothing else")
    finally:
        stop(procs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/debug"))
    args = parser.parse_args()
    bin_dir = pathlib.Path(args.bin_dir)
    work = pathlib.Path(tempfile.mkdtemp(prefix="dsd-tls-"))
    secret = work / "tls"
    secret.mkdir()
    secret_volume(secret, "router-a")
    pb, pb_grpc = grpc_stubs.generate(work)
    worker_port, grpc_port, http_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    procs = [
        subprocess.Popen([bin_dir / "deepseek-worker", "serve", "--listen", f"127.0.0.1:{worker_port}"], cwd=ROOT),
        subprocess.Popen([bin_dir / "deepseek-router", "--grpc-listen", f"127.0.0.1:{grpc_port}",
                          "--http-listen", f"127.0.0.1:{http_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                          "--backend", f"pool=cpu,addr=127.0.0.1:{worker_port}", "--health-interval-ms", "100",
                          "--tls-cert", str(secret / "tls.crt"), "--tls-key", str(secret / "tls.key")], cwd=ROOT),
    ]
    try:
        http_url = f"https://localhost:{http_port}/v1"
        trusting = httpx.Client(verify=trusting_ca())
        client = openai.OpenAI(base_url=http_url, api_key="none", max_retries=0, http_client=trusting)
        wait_ready(client)
        messages = [{"role": "user", "content": "Say something about operators."}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        check(reply.usage.completion_tokens == 4, "the OpenAI client over HTTPS, trusting the test CA")
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                     stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(streamed == reply.choices[0].message.content, "a streamed completion over HTTPS")

        for url, what in [(f"http://127.0.0.1:{http_port}/v1", "plaintext HTTP to the TLS port"),
                          (http_url, "a client that does not trust the test CA")]:
            refused = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=10)
            try:
                refused.models.list()
                check(False, f"{what} is refused")
            except openai.APIConnectionError:
                check(True, f"{what} is refused")

        credentials = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(CA).read_bytes())
        with grpc.secure_channel(f"localhost:{grpc_port}", credentials) as channel:
            request = pb.GenerateRequest(text="The operator", stopping=pb.StoppingCriteria(max_new_tokens=3))
            responses = list(pb_grpc.InferenceStub(channel).Generate(request, timeout=60))
            check(sum(len(r.token_ids) for r in responses) == 3, "gRPC Generate over TLS")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            generate_fails(pb_grpc, channel, request, grpc.StatusCode.UNAVAILABLE, "plaintext gRPC to the TLS port is refused")

        for path, status in [("/health", 200), ("/ready", 200)]:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=5) as response:
                check(response.status == status, f"{path} on the metrics port answers {status} (probes)")

        check(served_name(http_port) == "router-a", "the first certificate is served")
        load = Load(http_url, f"localhost:{grpc_port}", pb, pb_grpc)
        time.sleep(2)
        secret_volume(secret, "router-b")
        deadline = time.time() + 40
        while served_name(http_port) != "router-b" and time.time() < deadline:
            time.sleep(0.5)
        rotated = served_name(http_port) == "router-b" and served_name(grpc_port) == "router-b"
        time.sleep(2)
        load.stop()
        check(rotated, "the renewed certificate is served on both ports, without a restart")
        check(not load.errors and load.done >= 10,
              f"no failed request while it rotated ({load.done} done, errors: {load.errors[:3]})")
        check_mutual_tls(bin_dir, pb, pb_grpc)
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
