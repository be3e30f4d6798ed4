"""Shared LM plumbing for every script: model and tokenizer loading, chat encoding with the loss
masked on the prompt, padding and collation (the SFT loop is sft.py, the generation backends
generation.py).

GPU-only accelerations are chosen at run time: bf16 + FlashAttention-2 + Liger kernels when CUDA is
present and the package imports; float32 + SDPA otherwise. Nothing here knows a model family.
"""
import importlib.util
import logging

import torch

log = logging.getLogger("lm")

IGNORE_INDEX = -100
# Tokens some chat models keep for padding; used when a tokenizer has no pad token of its own.
PAD_CANDIDATES = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]"]


def has_package(name):
    return importlib.util.find_spec(name) is not None


def cuda_available():
    return torch.cuda.is_available()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template (use an instruct / chat checkpoint)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no end token (eos_token)")
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab), None)
        tokenizer.pad_token = pad or tokenizer.eos_token
        log.info("%s: no pad token; using %s", path, tokenizer.pad_token)
    return tokenizer


def load_model(path, device=None, dtype=None, on_cuda=None):
    """(model, tokenizer): bf16 + FlashAttention-2 + Liger for a model that runs on CUDA (`device`
    cuda, or `on_cuda` for one that a trainer moves there later) where installed; float32 + SDPA for
    one that stays on the CPU, whatever the machine."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    if on_cuda is None:
        on_cuda = device is not None and str(device).startswith("cuda")
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    flash = on_cuda and cuda_available() and has_package("flash_attn")
    kwargs = {"dtype": dtype, "attn_implementation": "flash_attention_2" if flash else "sdpa"}
    if on_cuda and has_package("liger_kernel"):
        from liger_kernel.transformers import AutoLigerKernelForCausalLM
        model = AutoLigerKernelForCausalLM.from_pretrained(path, **kwargs)
        kernels = "Liger"
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        kernels = "plain"
    if device is not None:
        model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("loaded %s (%s, %s attention, %s kernels, %.1f M parameters)", path, str(dtype).replace("torch.", ""),
             kwargs["attn_implementation"], kernels, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- encoding

def truncate_words(text, n):
    return " ".join(text.split()[:n])


def truncate_tokens(tokenizer, text, n):
    """`text` cut to its first `n` tokens (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n])


def chat_prompt_ids(tokenizer, prompt):
    """Token ids of a one-turn user prompt followed by the assistant header (generation prompt)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def encode_example(tokenizer, prompt, answer, max_len):
    """{"input_ids", "labels"} of a (prompt, answer) chat; labels are IGNORE_INDEX on the prompt.
    Over `max_len` tokens, the prompt's text loses its last tokens so that the answer and its end
    of turn stay whole (only an answer that cannot fit at all is cut)."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                         tokenize=True, return_dict=False)
    start = len(prompt_ids)
    if full[:start] != prompt_ids:  # templates that render the last turn differently: longest common prefix
        start = next((i for i, (a, b) in enumerate(zip(full, prompt_ids)) if a != b), min(len(full), start))
    over = len(full) - max_len
    if over > 0:
        head, tail = _template_ends(tokenizer)
        end = start - tail  # the prompt text ends where the template's tail (end of turn, assistant header) starts
        cut = min(over, max(0, end - head))
        full, start = full[:end - cut] + full[end:], start - cut
        full = full[:max_len]
    labels = [IGNORE_INDEX] * min(start, len(full)) + full[start:]
    return {"input_ids": full, "labels": labels}


def _template_ends(tokenizer):
    """(tokens before, tokens after) a user message in the chat template's generation prompt: the
    common prefix and suffix of two prompts that differ only in their text."""
    cached = getattr(tokenizer, "_zerogr_template_ends", None)
    if cached is None:
        a, b = chat_prompt_ids(tokenizer, "alpha 1"), chat_prompt_ids(tokenizer, "omega beta 2")
        head = next(i for i, (x, y) in enumerate(zip(a + [None], b + [-1])) if x != y)
        tail = next(i for i, (x, y) in enumerate(zip(a[::-1] + [None], b[::-1] + [-1])) if x != y)
        cached = tokenizer._zerogr_template_ends = (head, tail)
    return cached


def check_docid_tokens(tokenizer, gists, sample=50):
    """The DocID tokens the retriever learns (inside the chat) must be the trie's tokens."""
    bad = 0
    for _, doc_id in zip(range(sample), gists):  # the first `sample` (`gists` may be a large DocTable)
        ex = encode_example(tokenizer, "q", gists[doc_id], 10_000)
        answer = [t for t in ex["labels"] if t != IGNORE_INDEX]
        alone = tokenizer(gists[doc_id], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        bad += answer[:len(alone)] != alone
    if bad:
        log.warning("%d of %d DocIDs tokenize differently inside the chat template than alone: constrained "
                    "decoding may miss them", bad, min(sample, len(gists)))
    return bad


def pad_rows(rows, value, left=False):
    """(ids, mask): token lists padded with `value` into one long tensor, on the right (or the
    left), and the attention mask of the real tokens."""
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate(examples, pad_id):
    """Right-padded batch of encoded examples."""
    ids, mask = pad_rows([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad_rows([e["labels"] for e in examples], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
