"""The official OpenAI Python client against deepseek-router in front of a real worker.

Starts `deepseek-worker serve` (the tiny fixture model) and `deepseek-router` (with an API
key file) as processes on loopback, then drives them only through `openai.OpenAI`: chat and
completions, streaming and not, model listing, and the errors the client maps to its
exception types. Exits non-zero on the first failed check.

  python tests/openai/check_client.py --bin-dir target/debug
"""

import argparse
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "tiny-v3-bf16"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client, deadline_s=60):
    deadline = time.time() + deadline_s
    while True:
        try:
            if any(m.id == MODEL for m in client.models.list().data):
                return
        except openai.APIError:
            pass
        if time.time() > deadline:
            raise SystemExit("the router never listed the model")
        time.sleep(0.2)


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/debug"))
    args = parser.parse_args()
    bin_dir = pathlib.Path(args.bin_dir)
    worker_port, grpc_port, http_port = free_port(), free_port(), free_port()
    # The keys file holds the key's name and hash, as `deepseek-router hash-key` prints them.
    line = subprocess.run([bin_dir / "deepseek-router", "hash-key", "ci"], input="sk-test-key",
                          capture_output=True, text=True, check=True).stdout
    check("sk-test-key" not in line and line.startswith("ci sha256:"), "the keys file holds a hash")
    keys = tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False)
    keys.write(line)
    keys.close()
    procs = [
        # DeepSeek-V3's own chat template (the fixture's) never shows tools to the model.
        subprocess.Popen([bin_dir / "deepseek-worker", "serve", "--listen", f"127.0.0.1:{worker_port}",
                          "--chat-template", "deploy/chat-templates/deepseek-v3-tools.jinja"], cwd=ROOT),
        subprocess.Popen([bin_dir / "deepseek-router", "--grpc-listen", f"127.0.0.1:{grpc_port}",
                          "--http-listen", f"127.0.0.1:{http_port}", "--metrics-listen", "",
                          "--backend", f"pool=cpu,addr=127.0.0.1:{worker_port}",
                          "--api-keys-file", keys.name, "--health-interval-ms", "100"], cwd=ROOT),
    ]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="sk-test-key", max_retries=0)
        wait_ready(client)
        messages = [{"role": "user", "content": "Say something about operators."}]

        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        choice = reply.choices[0]
        check(reply.object == "chat.completion" and choice.message.role == "assistant", "chat completion shape")
        check(reply.usage.completion_tokens == 8 and choice.finish_reason == "length", "chat usage and finish reason")

        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(streamed == choice.message.content, "streamed chat text equals the non-streamed text (greedy)")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        check(finishes == ["length"], "one finish reason in the stream")
        check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8, "usage chunk at the end")

        scored = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True)
        tokens = scored.choices[0].logprobs.content
        check(len(tokens) == 8 and all(t.logprob <= 0 for t in tokens), "chat logprobs, one per token")
        check("".join(t.token for t in tokens) == scored.choices[0].message.content, "logprob tokens spell the text")

        completion = client.completions.create(model=MODEL, prompt="The operator", max_tokens=5, temperature=0)
        check(completion.object == "text_completion" and completion.usage.completion_tokens == 5, "text completion")
        by_ids = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0)
        check(by_ids.usage.prompt_tokens == 3, "completion from token ids")
        pieces = list(client.completions.create(model=MODEL, prompt="The operator", max_tokens=5, temperature=0,
                                                stream=True))
        check("".join(p.choices[0].text for p in pieces) == completion.choices[0].text,
              "streamed completion equals the non-streamed one")

        tools = [{"type": "function", "function": {"name": "get_weather"}}]
        forced = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                tools=tools, max_tokens=4, temperature=0,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}})
        cut_off = forced.choices[0]
        check(cut_off.finish_reason == "length" and not cut_off.message.tool_calls
              and cut_off.message.content.startswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"),
              "a forced call cut off by max_tokens comes back as its text, not dropped")
        fed_back = [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
        after = client.chat.completions.create(model=MODEL, messages=fed_back, tools=tools, max_tokens=2,
                                               extra_body={"ignore_eos": True})
        check(after.usage.completion_tokens == 2, "a call and its result fed back are answered")
        for bad, param in [({"tool_choice": "required"}, "tool_choice"),
                           ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                           ({"tools": [{"type": "retrieval"}]}, "tools")]:
            try:
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                               **{"tools": tools, **bad})
                check(False, f"{bad} refused")
            except openai.BadRequestError as e:
                check(e.body.get("param") == param, f"{bad} is BadRequestError naming {param}")

        try:
            client.chat.completions.create(model="gpt-4", messages=messages)
            check(False, "unknown model refused")
        except openai.NotFoundError as e:
            check(e.status_code == 404, "unknown model is NotFoundError (404)")
        try:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=100000)
            check(False, "oversized max_tokens refused")
        except openai.BadRequestError as e:
            check(e.body.get("param") == "max_tokens", "oversized max_tokens is BadRequestError naming max_tokens")
        try:
            openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="sk-wrong",
                          max_retries=0).models.list()
            check(False, "wrong API key refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, "wrong API key is AuthenticationError (401)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        pathlib.Path(keys.name).unlink()
    print("the OpenAI Python client works against the router")


if __name__ == "__main__":
    sys.exit(main())
