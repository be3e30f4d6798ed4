"""GPU check: every CUDA path a CPU cannot exercise, in at most about 4 minutes on one GPU.

    python -m benchmarks.gpu_check             # on a GPU node (from the repository root)
    python -m benchmarks.gpu_check --smoke     # CPU smoke mode: tiny shapes, a few steps (run by make test)

1. training: bf16 + Liger (+ FlashAttention-2 when installed) SFT of the tiny model, loss falling, then a
   resumed run continuing from the newest epoch checkpoint;
2. decoding: the five decoding modes on the GPU (fp32 and bf16) against the CPU (fp32) on a random
   model and trie: share of queries whose DocIDs agree (bf16 ties may differ), validity of each;
3. rerank on the GPU against the CPU;
4. throughput: K=100 reverse-annealed decoding with a random model shaped like Llama-3.2-3B (bf16)
   and a 500 k-DocID trie at batch 32 and 128: queries per second and peak GPU memory;
5. generation with the transformers backend;
6. the shard launcher's device assignment for the visible GPUs.
Prints its figures and, as its last line, one JSON object (`ok` is true when every check passed).
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import devices
import generation
import genir
import lm
import mair_config
import sft
from decoding import MODES, decode
from file_io import read_jsonl
from models import build_tiny
from prefix_tree import PrefixTree

LLAMA_3B = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
            "num_key_value_heads": 8, "vocab_size": 128256}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
SEED = 0


def random_model(shape, device, dtype):
    config = LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=shape["vocab_size"] - 1, pad_token_id=shape["vocab_size"] - 2)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def random_trie(n, vocab, rng):
    """n random DocIDs of 6-12 tokens over the vocabulary (the last id ends each DocID)."""
    lengths = rng.integers(6, 13, n)
    tokens = rng.integers(0, vocab - 2, int(lengths.sum()))
    return PrefixTree.from_arrays([f"d{i}" for i in range(n)], tokens, lengths, vocab - 1)


def random_prompts(n, vocab, rng, length=(24, 64)):
    return [rng.integers(1, vocab - 2, rng.integers(*length)).tolist() for _ in range(n)]


def check_training(device, tmp, smoke):
    """Loss falls over two epochs; a third epoch resumes from the newest checkpoint."""
    docs = read_jsonl(mair_config.docs_path("PyDoc-Sys"))[:64 if smoke else 512]
    cfg = {"lr": 2e-3, "batch_size": 16, "warmup_steps": 0, "epochs": 2, "max_steps": None, "seed": SEED,
           "keep_checkpoints": 1, "grad_accum": 1, "warmup_ratio": 0.0, "grad_clip": 1.0, "weight_decay": 0.0,
           "log_every": 10, "wandb": None, "wandb_project": "zerogr", "dist_timeout": 1800, "precision": "bf16",
           "ranknet_mode": "joint"}
    out = os.path.join(tmp, "sft")

    def train(epochs):
        model, tokenizer, resume = sft.load_for_training(build_tiny.OUT_DIR, out, cfg["precision"])
        examples = [lm.encode_example(tokenizer, lm.truncate_words(d["doc"], 48), d["id"], 128) for d in docs]
        summary = sft.train_sft(model, tokenizer, examples, out, sft.SFTSettings(**dict(cfg, epochs=epochs)),
                               resume_from=resume, desc="gpu_check")
        return model, summary

    started = time.time()
    model, first = train(2)
    os.remove(os.path.join(out, "training_complete.json"))
    _, resumed = train(3)
    losses = [h["loss"] for h in resumed["history"]]
    return {"ok": losses[1] < losses[0] and len(losses) == 3 and resumed["global_step"] > first["global_step"],
            "losses": [round(x, 4) for x in losses], "dtype": str(next(model.parameters()).dtype),
            "attention": model.config._attn_implementation, "liger": lm.has_package("liger_kernel") and device != "cpu",
            "flash_attn": lm.has_package("flash_attn"), "seconds": round(time.time() - started, 1)}


def _agreement(a, b):
    return sum(x.leaves == y.leaves for x, y in zip(a, b)) / max(len(a), 1)


def check_decoding(device, smoke):
    """Every mode on the device (fp32, bf16) against the CPU (fp32): agreement and validity."""
    rng = np.random.default_rng(SEED)
    shape = TINY if smoke else dict(TINY, hidden_size=256, intermediate_size=512, vocab_size=4096)
    tree = random_trie(2000, shape["vocab_size"], rng)
    prompts = random_prompts(16, shape["vocab_size"], rng)
    reference = random_model(shape, "cpu", torch.float32)
    out = {}
    for mode in MODES:
        settings = genir.decode_settings(mode=mode, K=10, num_beams=10, seed=SEED)
        cpu = decode(reference, tree, prompts, settings, progress=False)
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = random_model(shape, device, dtype)
            got = decode(model, tree, prompts, settings, progress=False)
            valid = all(len(set(r.leaves)) == len(r.leaves) > 0 for r in got)
            row[str(dtype).replace("torch.", "")] = {"agreement": round(_agreement(cpu, got), 3), "valid": valid}
        row["ok"] = row["float32"]["valid"] and row["bfloat16"]["valid"] and row["float32"]["agreement"] >= 0.75
        out[mode] = row
    return out


def check_rerank(device, smoke):
    """genir's rerank of random candidates on the device (fp32) against the CPU: same orders."""
    docs = read_jsonl(mair_config.docs_path("PyDoc-Net"))[:200]
    gists = {d["id"]: lm.truncate_words(d["doc"], 6) for d in docs}
    queries = [{"qid": str(i), "instruction": "", "query": d["doc"][:80]} for i, d in enumerate(docs[:8 if smoke else 32])]
    ids = list(gists)
    rankings = {q["qid"]: ids[5 * i:5 * i + 20] for i, q in enumerate(queries)}
    orders = {}
    for where in ("cpu", device):
        model, tokenizer = lm.load_model(build_tiny.OUT_DIR, device=where, dtype=torch.float32)
        token = genir.rank_token_id(tokenizer, model)
        orders[where] = genir.rerank(model, tokenizer, queries, rankings, gists, token)
    same = sum(orders["cpu"][q] == orders[device][q] for q in rankings) / len(rankings)
    return {"ok": same >= 0.75, "same_order": round(same, 3)}


def check_throughput(device, smoke):
    """Queries per second and peak memory of K=100 reverse-annealed decoding, 3B-shaped model."""
    rng = np.random.default_rng(SEED)
    shape, n_docids, K, batches = (TINY, 5000, 10, (4, 8)) if smoke else (LLAMA_3B, 500_000, 100, (32, 128))
    started = time.time()
    tree = random_trie(n_docids, shape["vocab_size"], rng)
    build = time.time() - started
    model = random_model(shape, device, torch.bfloat16 if device != "cpu" else torch.float32)
    out = {"model": "Llama-3.2-3B shape (random, bf16)" if not smoke else "tiny", "docids": n_docids, "K": K,
           "trie_build_seconds": round(build, 1)}
    for batch in batches:
        prompts = random_prompts(batch, shape["vocab_size"], rng, (48, 96))
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        found = decode(model, tree, prompts, genir.decode_settings(mode="reverse_annealed", K=K, batch_size=batch),
                       progress=False)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out[f"batch_{batch}"] = {"queries_per_second": round(batch / seconds, 2), "seconds": round(seconds, 2),
                                 "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                                 if device != "cpu" else None,
                                 "docids_per_query": round(sum(len(r.leaves) for r in found) / batch, 1)}
    out["ok"] = all(out[f"batch_{b}"]["docids_per_query"] == K for b in batches)
    return out


def check_generation(device, smoke):
    """The transformers generation backend samples n completions per prompt on the device."""
    generator = generation.HFGenerator(build_tiny.OUT_DIR, batch_size=8, seed=SEED)
    tokenizer = generator.tokenizer
    docs = read_jsonl(mair_config.docs_path("PyDoc-Net"))[:8]
    prompts = [lm.chat_prompt_ids(tokenizer, lm.truncate_words(d["doc"], 40)) for d in docs]
    start = time.perf_counter()
    outputs = generator.generate(prompts, n=4, max_tokens=16, desc="gpu_check generate")
    return {"ok": all(len(o) == 4 for o in outputs), "device": str(generator.model.device),
            "empty": sum(not t for o in outputs for t in o), "seconds": round(time.perf_counter() - start, 2)}


def check_launcher():
    """The shard-to-GPU assignment the launcher would use for 2 x the visible GPUs."""
    visible = devices.visible_devices()
    plan = devices.assign_shards(2 * max(len(visible), 1), visible)
    return {"ok": True, "visible": visible, "assignment": plan}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode: tiny shapes, a few steps")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --smoke on a CPU)")
    started = time.time()
    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    checks = {"training": lambda: check_training(device, tmp, args.smoke),
              "decoding": lambda: check_decoding(device, args.smoke),
              "rerank": lambda: check_rerank(device, args.smoke),
              "throughput": lambda: check_throughput(device, args.smoke),
              "generation": lambda: check_generation(device, args.smoke),
              "launcher": check_launcher}
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "smoke": args.smoke}
    try:
        for name, check in checks.items():
            t0 = time.time()
            try:
                report[name] = check()
            except Exception as e:  # report every check, even after one fails
                report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"{name} ({time.time() - t0:.1f} s): {json.dumps(report[name])}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["ok"] = all(r.get("ok", all(v.get("ok") for v in r.values() if isinstance(v, dict)))
                       for r in report.values() if isinstance(r, dict))
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
