#!/usr/bin/env python3
"""Writes "bench-small": a random DeepSeek-V3 checkpoint for engine benchmarks.

    .tools/fixtures-venv/bin/python bench/engine/make_bench_model.py .tools/bench-model/bench-small
    .tools/fixtures-venv/bin/python bench/engine/make_bench_model.py .tools/bench-model/bench-small-fp8 --fp8

model_type deepseek_v3 with the official checkpoint's layout and naming (per-expert tensors
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, f32 `e_score_correction_bias`,
everything else bf16, one model.safetensors), config.json in the official DeepSeek spelling
(`rope_theta` + `rope_scaling` with `"type": "yarn"`), and a throwaway byte-level BPE
tokenizer.json trained on this Python's standard-library sources with vocab = the model's
vocab_size (llama.cpp's converter needs a tokenizer; the benchmarks feed token ids).

Sizes: hidden 1024, 8 layers (layer 0 dense, intermediate 2816; layers 1-7 MoE), 64 routed
experts top-6 in 8 groups / top-4 groups (noaux_tc sigmoid routing, as V3), 1 shared expert,
moe_intermediate 512, 16 heads, q_lora_rank 384, kv_lora_rank 256, qk_nope 64, qk_rope 32,
v_head_dim 64, vocab 32000, YaRN (factor 4 over an original 1024 positions: 4096 positions),
about 0.81 B parameters, 0.14 B of them active per token.

Weights: N(0, 0.02) for every matrix (embeddings, attention, MLPs, experts, router, lm_head),
norms 1, e_score_correction_bias N(0, 0.02) (f32); drawn from numpy's PCG64 with a fixed seed
(the same files every run with the same numpy). Nothing is downloaded.

--fp8 writes the FP8 variant ("bench-small-fp8"), stored like the official DeepSeek-V3 FP8
checkpoint: the same f32 master weights (same seed, same draw order), and every matrix whose
all_shapes() kind is "linear" (attention projections, the dense MLP, routed and shared experts;
as make_fixtures.to_storage(fp8=True)) becomes float8_e4m3fn with a `<name>_scale_inv` f32 tensor
of shape [ceil(rows/128), ceil(cols/128)] beside it (per 128x128 block: scale = amax / 448,
q = e4m3(w / scale), w ~ f32(q) * scale_inv: make_fixtures.quantize_fp8 itself, a few seconds
for the whole model); embeddings, router, norms, lm_head stay bf16, e_score_correction_bias f32.
config.json gains the official `quantization_config` (dynamic activations, e4m3, 128x128 blocks).
The tokenizer is the same trainer's output: copy tokenizer.json and tokenizer_config.json from
bench-small and pass --skip-tokenizer to skip retraining.

bench_params.json: total_params, active_params_per_token, and the weight bytes one decoded token
reads: bf16_bytes_per_token, f32_bytes_per_token, fp8_bytes_per_token (FP8 storage: 1 byte per
FP8 element plus its 4-byte block scales, 2 bytes per bf16 element, 4 per f32 bias element).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import sysconfig
import time

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
from make_fixtures import BLOCK, V3_COMMON, all_shapes, quantize_fp8  # noqa: E402  (tensor list in official naming)
from make_tokenizer import CHAT_TEMPLATE, SPECIALS  # noqa: E402  (DeepSeek's specials, template)

SEED = 4242
INIT_STD = 0.02

CONFIG = {
    **V3_COMMON,
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 8,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 4,
    "n_shared_experts": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 384,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "max_position_embeddings": 4096,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 4,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 1024,
        "type": "yarn",
    },
    "routed_scaling_factor": 2.5,
    "initializer_range": INIT_STD,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}

# As in the official DeepSeek-V3 config.json (and tests/fixtures' tiny-v3-fp8).
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}


def n_blocks(shape: tuple[int, ...]) -> int:
    """Number of 128x128 blocks (= scale_inv elements) of a matrix, partial edge blocks included."""
    return -(-shape[0] // BLOCK) * -(-shape[1] // BLOCK)


def param_counts(cfg: dict) -> dict:
    """Total parameters, and the weights one decoded token reads (bf16 bytes, f32 bytes, and the
    bytes of the FP8 storage: FP8 linear weights + f32 block scales, bf16 rest, f32 bias)."""
    total = 0
    active = 0
    fp8_bytes = 0.0
    k, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    h = cfg["hidden_size"]
    for name, shape, kind in all_shapes(cfg):
        n = int(np.prod(shape))
        total += n
        if kind == "linear":
            nbytes = n + 4 * n_blocks(shape)
        elif kind == "bias":
            nbytes = 4 * n
        else:
            nbytes = 2 * n
        if ".mlp.experts." in name:
            active += n * k / E  # k of E routed experts per MoE layer
            fp8_bytes += nbytes * k / E
        elif name == "model.embed_tokens.weight":
            active += h  # one row is looked up
            fp8_bytes += 2 * h
        else:
            active += n
            fp8_bytes += nbytes
    active = int(active)
    return {
        "total_params": total,
        "active_params_per_token": active,
        "bf16_bytes_per_token": 2 * active,
        "f32_bytes_per_token": 4 * active,
        "fp8_bytes_per_token": int(fp8_bytes),
    }


def write_weights(cfg: dict, out: str, fp8: bool = False) -> None:
    rng = np.random.Generator(np.random.PCG64(SEED))
    tensors = {}
    for name, shape, kind in all_shapes(cfg):
        if kind == "norm":
            w = np.ones(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= INIT_STD
        if fp8 and kind == "linear":
            # quantised from the f32 master, as make_fixtures.to_storage(fp8=True)
            q, s = quantize_fp8(w)
            tensors[name] = q
            tensors[name + "_scale_inv"] = s
            continue
        t = torch.from_numpy(w)
        # e_score_correction_bias stays f32 as in the official checkpoint
        tensors[name] = t if kind == "bias" else t.to(torch.bfloat16)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert nbytes < 2 * 1024**3, "over 2 GiB: shard it"
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def corpus_files(limit_bytes: int) -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(p for p in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                   if "site-packages" not in p)
    out, size = [], 0
    for p in files:
        out.append(p)
        size += os.path.getsize(p)
        if size >= limit_bytes:
            break
    return out


def write_tokenizer(cfg: dict, out: str) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos = SPECIALS[0], SPECIALS[1]
    files = corpus_files(24 * 1024 * 1024)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg["vocab_size"],
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    def texts():
        for p in files:
            with open(p, encoding="utf-8", errors="replace") as f:
                yield f.read()

    tok.train_from_iterator(texts(), trainer)
    n = tok.get_vocab_size()
    assert n <= cfg["vocab_size"], n
    assert tok.token_to_id(bos) == cfg["bos_token_id"] and tok.token_to_id(eos) == cfg["eos_token_id"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, cfg["bos_token_id"])]
    )
    tok.save(os.path.join(out, "tokenizer.json"))
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    tcfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {**added, "content": bos},
        "eos_token": {**added, "content": eos},
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        f.write(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--skip-tokenizer", action="store_true", help="keep an existing tokenizer.json")
    ap.add_argument("--skip-weights", action="store_true", help="keep an existing model.safetensors")
    ap.add_argument("--fp8", action="store_true",
                    help="store the linear weights as float8_e4m3fn with 128x128 block scales (bench-small-fp8)")
    args = ap.parse_args()
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    cfg = {**CONFIG, "quantization_config": FP8_QUANTIZATION_CONFIG} if args.fp8 else CONFIG
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(text)
    counts = param_counts(CONFIG)
    with open(os.path.join(out, "bench_params.json"), "w") as f:
        json.dump({**counts, "seed": SEED, "init_std": INIT_STD, "storage": "fp8" if args.fp8 else "bf16",
                   "config_sha256": hashlib.sha256(text.encode()).hexdigest()}, f, indent=2)
        f.write("\n")
    if not (args.skip_weights and os.path.exists(os.path.join(out, "model.safetensors"))):
        write_weights(CONFIG, out, fp8=args.fp8)
        print(f"weights written in {time.time() - t0:.1f} s")
    if not (args.skip_tokenizer and os.path.exists(os.path.join(out, "tokenizer.json"))):
        t1 = time.time()
        n = write_tokenizer(CONFIG, out)
        print(f"tokenizer: {n} tokens (model vocab {CONFIG['vocab_size']}) in {time.time() - t1:.1f} s")
    for fn in sorted(os.listdir(out)):
        print(f"  {fn}: {os.path.getsize(os.path.join(out, fn)):,} bytes")
    print(f"total params:            {counts['total_params']:,}")
    print(f"active params per token: {counts['active_params_per_token']:,}")
    print(f"weight bytes read per decoded token: bf16 {counts['bf16_bytes_per_token'] / 1e6:.1f} MB, "
          f"f32 {counts['f32_bytes_per_token'] / 1e6:.1f} MB, fp8 storage {counts['fp8_bytes_per_token'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
