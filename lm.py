"""Shared LM plumbing for every script: model loading, chat encoding with the loss masked on the
prompt, collation and the SFT loop on `accelerate` (the generation backends are generation.py).

GPU-only accelerations are chosen at run time: bf16 + FlashAttention-2 + Liger kernels when CUDA is
present and the package imports; float32 + SDPA otherwise. Nothing here knows a model family.
"""
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from file_io import apply_umask, write_json

log = logging.getLogger("lm")

IGNORE_INDEX = -100
# Tokens some chat models keep for padding; used when a tokenizer has no pad token of its own.
PAD_CANDIDATES = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]"]


def has_package(name):
    return importlib.util.find_spec(name) is not None


def cuda_available():
    return torch.cuda.is_available()


def attention_implementation():
    if cuda_available() and has_package("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


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
    kwargs = {"dtype": dtype, "attn_implementation": attention_implementation() if on_cuda else "sdpa"}
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
    """{"input_ids", "labels"} of a (prompt, answer) chat; labels are IGNORE_INDEX on the prompt."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                         tokenize=True, return_dict=False)
    start = len(prompt_ids)
    if full[:start] != prompt_ids:  # templates that render the last turn differently: longest common prefix
        start = next((i for i, (a, b) in enumerate(zip(full, prompt_ids)) if a != b), min(len(full), start))
    full = full[:max_len]
    labels = [IGNORE_INDEX] * min(start, len(full)) + full[start:]
    return {"input_ids": full, "labels": labels}


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


# ---------------------------------------------------------------------------------------------- training

class SFTModule(torch.nn.Module):
    """The model plus its training loss in one forward, so DDP sees every parameter use.

    The LM head runs only at the positions that carry a label (the answer tokens): on long prompts
    with short answers this is most of the training cost saved. `extra_loss(lm, extra)` adds an
    auxiliary loss (the retriever's ranking loss) on steps whose batch has an "extra" entry.
    """

    def __init__(self, lm, extra_loss=None):
        super().__init__()
        self.lm = lm
        self.extra_loss = extra_loss

    def forward(self, input_ids, attention_mask, labels, extra=None):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, targets[keep])
        if extra is not None:
            loss = loss + self.extra_loss(self.lm, extra)
        return loss


DIST_TIMEOUT_S = 1800  # a collective waiting longer than this means a rank died or hangs


def init_distributed(timeout_s=DIST_TIMEOUT_S):
    """This process's accelerate state; under a multi-process launch the process group is created
    here (once per process) with `timeout_s`, so a rank that dies or hangs stops the others."""
    from datetime import timedelta

    from accelerate import PartialState
    return PartialState(cpu=not cuda_available(), timeout=timedelta(seconds=timeout_s))


CHECKPOINT = re.compile(r"checkpoint-epoch(\d+)(\.tmp)?$")


def _checkpoints(out_dir):
    """Names of the complete epoch checkpoints under `out_dir`, oldest first. The temporary directory
    of a save that was killed (checkpoint-epoch<N>.tmp) is removed, with a warning."""
    if not os.path.isdir(out_dir):
        return []
    found = [(d, m) for d in os.listdir(out_dir) if (m := CHECKPOINT.match(d))]
    for name in sorted(d for d, m in found if m.group(2)):
        log.warning("%s: removing %s, left by a checkpoint save that did not finish", out_dir, name)
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    done = [(int(m.group(1)), d) for d, m in found
            if not m.group(2) and os.path.exists(os.path.join(out_dir, d, "trainer_state.json"))]
    return [d for _, d in sorted(done)]


def last_checkpoint(out_dir):
    """Path of the newest complete epoch checkpoint under `out_dir`, or None."""
    done = _checkpoints(out_dir)
    return os.path.join(out_dir, done[-1]) if done else None


def training_done(out_dir):
    return os.path.exists(os.path.join(out_dir, "training_complete.json"))


def _save_dir_atomically(out_dir, name, save_fn):
    """Write a directory with `save_fn(tmp_dir)`, then rename it into place."""
    final = os.path.join(out_dir, name)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fn(tmp)
    apply_umask(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def wandb_run(setting, project, name, out_dir, config=None):
    """A wandb run when `setting` (online / offline, else $WANDB_MODE) turns it on, else None."""
    mode = str(setting or os.environ.get("WANDB_MODE") or "disabled").lower()
    if mode in ("0", "false", "disabled", "off", "none") or not has_package("wandb"):
        return None
    import wandb
    return wandb.init(project=project, name=name, mode="online" if mode in ("1", "true", "online") else mode,
                      config=config, dir=out_dir)


class ShuffledOrder(torch.utils.data.RandomSampler):
    """A seeded RandomSampler (a generator, no replacement) without its Python list of every index
    (about 40 bytes an example, GBs on a large corpus): the epoch's permutation stays a tensor (8
    bytes an example), handed out in slices. The same generator draws, so the same order, epoch
    after epoch; train_sft saves its state with each checkpoint, so a resumed run continues it."""

    def __iter__(self):
        n, step = len(self.data_source), 1 << 16
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n, step):
            yield from order[start:start + step].tolist()
        del order
        torch.randperm(n, generator=self.generator)  # RandomSampler draws an unused one at each epoch's end


def sft_loader(examples, batch_size, seed, pad_id):
    """Shuffled (seeded), right-padded batches of `examples`: a list or any map-style dataset."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, generator=generator,
                                       sampler=ShuffledOrder(examples, generator=generator),
                                       collate_fn=lambda b: collate(b, pad_id))


class SeededBatches:
    """Base of an `extra_batches` supplier that draws from `self.rng` (a random.Random): train_sft
    saves its state with each epoch checkpoint and restores it on resume."""

    def extra_state(self):
        return self.rng.getstate()

    def load_extra_state(self, state):
        self.rng.setstate(state)


def _random_states(order, extra_batches):
    """This process's random states: python, numpy, torch (CPU and its CUDA device), the data order's
    generator and the extra-batch supplier's (when it has `extra_state()`)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "order": order.get_state()}
    if cuda_available():  # this process's device only: every device's would open a context on each
        state["cuda"] = torch.cuda.get_rng_state()
    if hasattr(extra_batches, "extra_state"):
        state["extra"] = extra_batches.extra_state()
    return state


def _restore_random_states(states, accelerator, order, extra_batches, desc):
    """Set the random states a checkpoint saved (one per process) in this process."""
    if not states:
        log.warning("%s: the checkpoint has no random states (an older version's): the resumed run will not "
                    "match an uninterrupted one exactly", desc)
        return
    if len(states) != accelerator.num_processes:
        log.warning("%s: checkpoint saved by %d processes, resumed on %d: data order continues, per-process "
                    "random states are rank 0's", desc, len(states), accelerator.num_processes)
    state = states[accelerator.process_index if len(states) == accelerator.num_processes else 0]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    order.set_state(state["order"])
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "extra" in state and hasattr(extra_batches, "load_extra_state"):
        extra_batches.load_extra_state(state["extra"])


def train_sft(model, tokenizer, examples, out_dir, cfg, extra_loss=None, extra_batches=None,
              resume_from=None, desc="sft"):
    """Fine-tune `model` on encoded `examples` (a list or a map-style dataset) with AdamW, constant LR
    after warmup, grad clip, gradient accumulation; a checkpoint (model + tokenizer + optimizer
    state) per epoch; resume.

    cfg keys: lr, epochs, batch_size, grad_accum, warmup_steps (int) or warmup_ratio (fraction of
    an epoch), grad_clip, seed, log_every, wandb, wandb_project, keep_checkpoints (newest epoch
    checkpoints kept; 0 = all), dist_timeout (seconds). `extra_batches(step)` returns the
    auxiliary batch (or None) for a step; `extra_loss(lm, batch)` scores it.
    Each checkpoint also holds every process's random states, the data order's and `extra_batches`'
    (see SeededBatches), so a run killed at any point and resumed ends as an uninterrupted one.
    Returns a summary dict (losses per epoch, steps, seconds, num_processes).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from transformers import get_constant_schedule_with_warmup

    init_distributed(cfg.get("dist_timeout", DIST_TIMEOUT_S))
    accelerator = Accelerator(cpu=not cuda_available(), gradient_accumulation_steps=cfg.get("grad_accum", 1))
    set_seed(cfg.get("seed", 0))
    main = accelerator.is_main_process
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    loader = sft_loader(examples, cfg["batch_size"], cfg.get("seed", 0), tokenizer.pad_token_id)
    order = loader.generator
    module = SFTModule(model, extra_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / cfg.get("grad_accum", 1))
    warmup = cfg.get("warmup_steps")
    if warmup is None:
        warmup = int(cfg.get("warmup_ratio", 0.0) * steps_per_epoch)
    scheduler = get_constant_schedule_with_warmup(optimizer, warmup)

    start_epoch, global_step, history, state = 0, 0, [], None
    resume_from = resume_from or last_checkpoint(out_dir)
    if resume_from:
        state = torch.load(os.path.join(resume_from, "optimizer.pt"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        meta = json.load(open(os.path.join(resume_from, "trainer_state.json")))
        start_epoch, global_step, history = meta["epoch"], meta["global_step"], meta["history"]
        if main:
            log.info("%s: resuming from %s (epoch %d done, step %d)", desc, resume_from, start_epoch, global_step)

    run = wandb_run(cfg.get("wandb"), cfg.get("wandb_project", "zerogr"), os.path.basename(out_dir.rstrip("/")),
                    out_dir, cfg) if main else None
    if main:
        log.info("%s: %d examples, %d processes, %d optimizer steps/epoch, %d epochs, warmup %d -> %s",
                 desc, len(examples), accelerator.num_processes, steps_per_epoch, cfg["epochs"], warmup, out_dir)
    if state is not None:  # last before the loop: nothing may draw between the restore and the first batch
        _restore_random_states(state.get("random"), accelerator, order, extra_batches, desc)
    started = time.time()
    for epoch in range(start_epoch, cfg["epochs"]):
        module.train()
        running, total, count = None, 0.0, 0
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{cfg['epochs']}", disable=not main, dynamic_ncols=True)
        for i, batch in enumerate(bar):
            extra = extra_batches(global_step) if extra_batches is not None else None
            if extra is not None:
                extra = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in extra.items()}
            with accelerator.accumulate(module):
                loss = module(**batch, extra=extra)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(module.parameters(), cfg.get("grad_clip", 1.0))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                scheduler.step()
                global_step += 1
            value = loss.item()
            total, count = total + value, count + 1
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if run and global_step % cfg.get("log_every", 10) == 0 and accelerator.sync_gradients:
                run.log({"loss": value, "lr": scheduler.get_last_lr()[0], "epoch": epoch}, step=global_step)
        mean_loss = accelerator.gather(torch.tensor([total / max(count, 1)], device=accelerator.device)).mean().item()
        history.append({"epoch": epoch + 1, "loss": mean_loss, "steps": global_step,
                        "seconds": round(time.time() - started, 1)})
        states = gather_object([_random_states(order, extra_batches)])
        if main:
            _save_checkpoint(accelerator, module, tokenizer, optimizer, scheduler, states, out_dir, epoch + 1,
                             global_step, history, cfg.get("keep_checkpoints", 0))
            log.info("%s: epoch %d mean loss %.4f", desc, epoch + 1, mean_loss)
        accelerator.wait_for_everyone()

    summary = {"history": history, "global_step": global_step, "num_processes": accelerator.num_processes,
               "seconds": round(time.time() - started, 1)}
    if main:
        unwrapped = accelerator.unwrap_model(module).lm
        unwrapped.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        apply_umask(out_dir)
        write_json(summary, os.path.join(out_dir, "training_complete.json"))  # written last: marks the model done
        if run:
            import wandb
            table = wandb.Table(columns=["epoch", "loss", "steps", "seconds"],
                                data=[[h["epoch"], h["loss"], h["steps"], h["seconds"]] for h in history])
            run.log({"epochs": table})
            run.finish()
        log.info("%s: done, model saved to %s", desc, out_dir)
    accelerator.wait_for_everyone()  # no end_training(): it destroys the process group the next corpus needs
    return summary


def _save_checkpoint(accelerator, module, tokenizer, optimizer, scheduler, random_states, out_dir, epoch, global_step,
                     history, keep=0):
    lm = accelerator.unwrap_model(module).lm

    def save(path):
        lm.save_pretrained(path)
        tokenizer.save_pretrained(path)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "random": random_states}, os.path.join(path, "optimizer.pt"))
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"epoch": epoch, "global_step": global_step, "history": history,
                       "num_processes": accelerator.num_processes}, f, indent=2)

    path = _save_dir_atomically(out_dir, f"checkpoint-epoch{epoch}", save)
    older = _checkpoints(out_dir)[:-1]
    for name in older:  # optimizer and random states are only needed to resume from the newest
        stale = os.path.join(out_dir, name, "optimizer.pt")
        if os.path.exists(stale):
            os.remove(stale)
    if keep > 0:
        for name in older[:max(0, len(older) + 1 - keep)]:
            shutil.rmtree(os.path.join(out_dir, name))
            log.info("removed %s (keep_checkpoints=%d)", name, keep)
    log.info("checkpoint: %s", path)


def load_for_training(base_path, out_dir):
    """Model and tokenizer to train: the newest checkpoint in `out_dir` if any, else `base_path`."""
    resume = last_checkpoint(out_dir)
    return (*load_model(resume or base_path, on_cuda=cuda_available()), resume)


def sft_config(C):
    """The train_sft settings from a script's constants."""
    keys = ("lr", "epochs", "batch_size", "grad_accum", "warmup_steps", "warmup_ratio", "grad_clip", "seed",
            "log_every", "wandb", "wandb_project", "weight_decay", "keep_checkpoints", "dist_timeout")
    return {k: C[k.upper()] for k in keys if k.upper() in C}


def run_sft(C, encode_examples, desc):
    """Train C["BASE_MODEL"] into C["OUT_DIR"] on `encode_examples(tokenizer)`, resuming, unless already done."""
    if training_done(C["OUT_DIR"]):
        log.info("%s: %s is already trained (training_complete.json); delete it to retrain", desc, C["OUT_DIR"])
        return None
    model, tokenizer, resume = load_for_training(C["BASE_MODEL"], C["OUT_DIR"])
    examples = encode_examples(tokenizer)
    return train_sft(model, tokenizer, examples, C["OUT_DIR"], sft_config(C), resume_from=resume, desc=desc)
