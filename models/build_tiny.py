"""Build the offline tiny model: a byte-level BPE tokenizer trained on the demo corpus, a
Llama-3-style chat template, and a small randomly initialised Llama, saved with `save_pretrained`.

Deterministic: the same corpus and seed give byte-identical files.

    python -m models.build_tiny [--out models/tiny-llama] [--layers 2] [--hidden 128] [--vocab 4096]
"""
import argparse
import logging
import time
from pathlib import Path

import mair_config
from file_io import apply_umask, iter_jsonl

log = logging.getLogger("build_tiny")

OUT_DIR = str(Path(__file__).resolve().parent / "tiny-llama")
BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
# Reserved tokens, as in Llama 3: the retriever's ranking head uses the first one.
RESERVED = [f"<|reserved_special_token_{i}|>" for i in range(4)]
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT, PAD] + RESERVED

# Llama-3 layout: BOS, then per message a role header, a blank line, the content and end-of-turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def corpus_texts(root=None):
    """Documents, queries and instructions of the demo training and evaluation tasks (the tokenizer's training text)."""
    for task in mair_config.DEMO_TRAIN_TASKS + mair_config.DEMO_EVAL_TASKS:  # not the development tasks
        for row in iter_jsonl(mair_config.docs_path(task, root)):
            yield row["doc"]
        for row in iter_jsonl(mair_config.queries_path(task, root)):
            yield row["instruction"]
            yield row["query"]


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def build(out_dir=OUT_DIR, root=None, layers=2, hidden=128, heads=4, vocab=4096, seed=0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    start = time.time()
    tokenizer = train_tokenizer(corpus_texts(root), vocab)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT, PAD)}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[EOS]], pad_token_id=ids[PAD])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[EOS]], pad_token_id=ids[PAD],
        do_sample=True, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=64)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    apply_umask(out_dir)  # safetensors writes its file 0600
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny model: %d layers x %d wide, vocab %d, %.2f M parameters -> %s (%.1f s)",
             layers, hidden, len(tokenizer), n_params / 1e6, out_dir, time.time() - start)
    return n_params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--root", default=None, help="dataset root holding the demo corpus")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build(args.out, args.root, args.layers, args.hidden, args.heads, args.vocab, args.seed)


if __name__ == "__main__":
    main()
