"""Supervised fine-tuning for the three trainers (sftqg.py, sftid.py, genir.py) on `accelerate`:
the loss on answer tokens only, AdamW with warmup, an epoch checkpoint that resumes exactly, and the
process-group plumbing a multi-GPU launch shares with evaluation.
"""
import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import time
from datetime import timedelta

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lm
from file_io import apply_umask, read_json, write_json

log = logging.getLogger("sft")


class SFTModule(torch.nn.Module):
    """The model plus its training loss in one forward, so DDP sees every parameter use.

    The LM head runs only at the positions that carry a label (the answer tokens): on long prompts
    with short answers this is most of the training cost saved. `extra_loss(lm, extra)` adds an
    auxiliary loss (the retriever's ranking loss) on steps whose batch has an "extra" entry; called
    with `extra` alone, the forward is that loss only (a step of its own, RANKNET_MODE "released").
    """

    def __init__(self, model, extra_loss=None):
        super().__init__()
        self.lm = model
        self.extra_loss = extra_loss

    def forward(self, input_ids=None, attention_mask=None, labels=None, extra=None):
        loss = None
        if input_ids is not None:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != lm.IGNORE_INDEX
            logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
            loss = F.cross_entropy(logits, targets[keep])
        if extra is not None:
            extra_loss = self.extra_loss(self.lm, extra)
            loss = extra_loss if loss is None else loss + extra_loss
        return loss


PRECISIONS = ("bf16", "fp32_autocast")
RANKNET_MODES = ("released", "joint")


def training_precision(precision, on_cuda):
    """(the weights' dtype, accelerate's mixed_precision) of a trainer, as PRECISION says: "bf16", bf16
    weights with AdamW on them (the released code); "fp32_autocast", fp32 master weights under bf16
    autocast. A model trained on the CPU stays float32 whatever the setting (logged once)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if not on_cuda:
        _cpu_precision_note(precision)
        return torch.float32, "no"
    return (torch.bfloat16, "no") if precision == "bf16" else (torch.float32, "bf16")


@functools.cache
def _cpu_precision_note(precision):
    log.info("PRECISION=%s applies to CUDA only: training in float32 on the CPU", precision)


def init_distributed(timeout_s):
    """This process's accelerate state; under a multi-process launch the process group is created
    here (once per process) with `timeout_s`, so a rank that dies or hangs stops the others."""
    from accelerate import PartialState
    return PartialState(cpu=not lm.cuda_available(), timeout=timedelta(seconds=timeout_s))


def split_for_process(items, timeout_s):
    """This process's share of `items` under accelerate / torchrun (all of them in one process), and
    the process state (init_distributed: rank, process count, device)."""
    state = init_distributed(timeout_s)
    return items[state.process_index::state.num_processes], state


def gather(local, state):
    """The `local` results of every process, joined into one list (`local` itself in a single process)."""
    from accelerate.utils import gather_object
    if state.num_processes == 1:
        return local
    return [x for part in gather_object([local]) for x in part]


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


def epochs_trained(out_dir):
    """The number of epochs of the finished training in `out_dir` (the last one maybe cut short by max_steps)."""
    return len(read_json(os.path.join(out_dir, "training_complete.json"))["history"])


def wandb_run(setting, project, name, out_dir, config=None):
    """A wandb run when `setting` (online / offline, else $WANDB_MODE) turns it on, else None."""
    mode = str(setting or os.environ.get("WANDB_MODE") or "disabled").lower()
    if mode in ("0", "false", "disabled", "off", "none") or not lm.has_package("wandb"):
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
                                       collate_fn=lambda b: lm.collate(b, pad_id))


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
    if lm.cuda_available():  # this process's device only: every device's would open a context on each
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
    if "cuda" in state and lm.cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "extra" in state and hasattr(extra_batches, "load_extra_state"):
        extra_batches.load_extra_state(state["extra"])


@dataclasses.dataclass
class SFTSettings:
    """train_sft's settings, the scripts' constants in lower case: AdamW's lr (constant after warmup), weight_decay;
    batch_size per process; warmup_steps (None: warmup_ratio of an epoch's steps); grad_clip: max gradient norm;
    wandb mode (None: $WANDB_MODE), logs every log_every steps; max_steps: a budget of optimizer steps (None: `epochs`
    whole epochs; else as many epochs as it takes, the last one cut short); keep_checkpoints (0 = all);
    dist_timeout in s; precision on CUDA (see training_precision); ranknet_mode, how an extra loss trains:
    "joint", added to the LM loss of its step; "released", after that step a forward, backward, optimizer and
    scheduler step of its own."""
    lr: float
    epochs: int
    max_steps: int | None
    batch_size: int
    grad_accum: int
    warmup_steps: int | None
    warmup_ratio: float
    grad_clip: float
    weight_decay: float
    seed: int
    log_every: int
    wandb: str | None
    wandb_project: str
    keep_checkpoints: int
    dist_timeout: float
    precision: str
    ranknet_mode: str


def train_sft(model, tokenizer, examples, out_dir, settings, extra_loss=None, extra_batches=None,
              resume_from=None, desc="sft", after_epoch=None):
    """Fine-tune `model` on encoded `examples` (a list or a map-style dataset) as SFTSettings `settings` say, with
    a checkpoint per epoch holding every process's random states (see SeededBatches): a run killed and resumed ends
    as an uninterrupted one. Adds `extra_loss(lm, extra_batches(step))` where that is not None. `after_epoch(epoch,
    model)`, when given, runs on every process after each epoch's checkpoint but the last (epoch from 1; the causal
    LM unwrapped from DDP, put back in train mode afterwards). A dataset with `set_epoch(epoch)` is told each epoch
    (from 0) before it is read. Returns a summary."""
    training = _Training(model, tokenizer, examples, out_dir, settings, extra_loss, extra_batches, desc)
    resume_from = resume_from or last_checkpoint(out_dir)
    state = training.resume(resume_from) if resume_from else None
    run = wandb_run(settings.wandb, settings.wandb_project, os.path.basename(out_dir.rstrip("/")), out_dir,
                    dataclasses.asdict(settings)) if training.main else None
    if training.main:
        log.info("%s: %d examples, %d processes, %d optimizer steps/epoch, %d epochs, warmup %d, autocast %s -> %s",
                 desc, len(examples), training.accelerator.num_processes, training.steps_per_epoch, training.epochs,
                 training.warmup, training.accelerator.mixed_precision, out_dir)
    if state is not None:  # last before the loop: nothing may draw between the restore and the first batch
        _restore_random_states(state.get("random"), training.accelerator, training.order, extra_batches, desc)
    started = time.time()
    for epoch in range(training.start_epoch, training.epochs):
        training.train_epoch(epoch, run, started)
        if after_epoch is not None and epoch + 1 < training.epochs:
            after_epoch(epoch + 1, training.accelerator.unwrap_model(training.module).lm)
            training.module.train()
    return training.finish(run, started)


class _Training:
    """One train_sft call's parts prepared by accelerate, and its progress; each method one step."""

    def __init__(self, model, tokenizer, examples, out_dir, settings, extra_loss, extra_batches, desc):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_constant_schedule_with_warmup

        init_distributed(settings.dist_timeout)
        if settings.ranknet_mode not in RANKNET_MODES:
            raise ValueError(f"unknown ranknet_mode {settings.ranknet_mode!r}: one of {', '.join(RANKNET_MODES)}")
        on_cuda = lm.cuda_available()
        self.accelerator = Accelerator(cpu=not on_cuda, gradient_accumulation_steps=settings.grad_accum,
                                       mixed_precision=training_precision(settings.precision, on_cuda)[1])
        set_seed(settings.seed)
        self.main = self.accelerator.is_main_process
        if not examples:
            raise ValueError(f"{desc}: no training examples")
        loader = sft_loader(examples, settings.batch_size, settings.seed, tokenizer.pad_token_id)
        self.order = loader.generator
        module = SFTModule(model, extra_loss)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.module, self.optimizer, self.loader = self.accelerator.prepare(module, optimizer, loader)
        self.steps_per_epoch = steps = math.ceil(len(self.loader) / settings.grad_accum)
        self.warmup = int(settings.warmup_ratio * steps) if settings.warmup_steps is None else settings.warmup_steps
        self.epochs = settings.epochs if settings.max_steps is None else math.ceil(settings.max_steps / steps)
        self.scheduler = get_constant_schedule_with_warmup(self.optimizer, self.warmup)
        self.tokenizer, self.out_dir, self.settings, self.extra_batches, self.desc = \
            tokenizer, out_dir, settings, extra_batches, desc
        self.start_epoch, self.global_step, self.extra_steps, self.history = 0, 0, 0, []

    def resume(self, path):
        """Optimizer, schedule and progress from the checkpoint at `path`; returns its saved state."""
        state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        meta = json.load(open(os.path.join(path, "trainer_state.json")))
        self.start_epoch, self.global_step, self.history = meta["epoch"], meta["global_step"], meta["history"]
        self.extra_steps = meta.get("extra_steps", 0)
        if self.main:
            log.info("%s: resuming from %s (epoch %d done, step %d)", self.desc, path, self.start_epoch,
                     self.global_step)
        return state

    def train_epoch(self, epoch, run, started):
        """Epoch `epoch` (from 0), then its checkpoint."""
        from accelerate.utils import gather_object

        accelerator, scheduler = self.accelerator, self.scheduler
        self.module.train()
        running, total, count = None, 0.0, 0
        self.loader.set_epoch(epoch)  # accelerate's loader: tells a dataset with set_epoch, also after a resume
        bar = tqdm(self.loader, desc=f"{self.desc} epoch {epoch + 1}/{self.epochs}", disable=not self.main,
                   dynamic_ncols=True)
        own_step = self.settings.ranknet_mode == "released"
        for batch in bar:
            step = self.global_step
            extra = None if own_step else self.extra_batch(step)
            with accelerator.accumulate(self.module):
                loss = self.module(**batch, extra=extra)
                self.update(loss)
            if accelerator.sync_gradients:
                scheduler.step()
                self.global_step += 1
                if own_step and (extra := self.extra_batch(step)) is not None:
                    # the extra loss in a step of its own, counted by the schedule as the released code did
                    self.update(self.module(extra=extra) * self.settings.grad_accum)  # backward divides by it
                    scheduler.step()
                    self.extra_steps += 1
            value = loss.item()
            total, count = total + value, count + 1
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if run and self.global_step % self.settings.log_every == 0 and accelerator.sync_gradients:
                run.log({"loss": value, "lr": scheduler.get_last_lr()[0], "epoch": epoch}, step=self.global_step)
            if accelerator.sync_gradients and self.global_step == self.settings.max_steps:
                break
        mean_loss = accelerator.gather(torch.tensor([total / max(count, 1)], device=accelerator.device)).mean().item()
        self.history.append({"epoch": epoch + 1, "loss": mean_loss, "steps": self.global_step,
                             "seconds": round(time.time() - started, 1)})
        states = gather_object([_random_states(self.order, self.extra_batches)])
        if self.main:
            self.save_checkpoint(states, epoch + 1)
            log.info("%s: epoch %d mean loss %.4f", self.desc, epoch + 1, mean_loss)
        accelerator.wait_for_everyone()

    def extra_batch(self, step):
        """The extra-loss batch of optimizer step `step` on this device, or None."""
        extra = self.extra_batches(step) if self.extra_batches is not None else None
        if extra is not None:
            extra = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in extra.items()}
        return extra

    def update(self, loss):
        """Backward; on a step that syncs gradients, clip them and step the optimizer."""
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.module.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(self, random_states, epoch):
        """checkpoint-epoch<epoch>, written as <that>.tmp and renamed into place; older ones pruned."""
        path = os.path.join(self.out_dir, f"checkpoint-epoch{epoch}")
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.accelerator.unwrap_model(self.module).lm.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "random": random_states}, os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"epoch": epoch, "global_step": self.global_step, "extra_steps": self.extra_steps,
                       "history": self.history, "num_processes": self.accelerator.num_processes}, f, indent=2)
        apply_umask(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        older = _checkpoints(self.out_dir)[:-1]
        for name in older:  # optimizer and random states are only needed to resume from the newest
            stale = os.path.join(self.out_dir, name, "optimizer.pt")
            if os.path.exists(stale):
                os.remove(stale)
        keep = self.settings.keep_checkpoints
        if keep > 0:
            for name in older[:max(0, len(older) + 1 - keep)]:
                shutil.rmtree(os.path.join(self.out_dir, name))
                log.info("removed %s (keep_checkpoints=%d)", name, keep)
        log.info("checkpoint: %s", path)

    def finish(self, run, started):
        """The final model, then training_complete.json; returns the summary it holds."""
        summary = {"history": self.history, "global_step": self.global_step, "extra_steps": self.extra_steps,
                   "num_processes": self.accelerator.num_processes, "seconds": round(time.time() - started, 1)}
        if self.main:
            self.accelerator.unwrap_model(self.module).lm.save_pretrained(self.out_dir)
            self.tokenizer.save_pretrained(self.out_dir)
            apply_umask(self.out_dir)
            write_json(summary, os.path.join(self.out_dir, "training_complete.json"))  # last: marks the model done
            if run:
                import wandb
                columns = ["epoch", "loss", "steps", "seconds"]
                run.log({"epochs": wandb.Table(columns=columns, data=[[h[c] for c in columns] for h in self.history])})
                run.finish()
            log.info("%s: done, model saved to %s", self.desc, self.out_dir)
        self.accelerator.wait_for_everyone()  # no end_training(): it destroys the process group the next corpus needs
        return summary


def load_for_training(base_path, out_dir, precision):
    """Model and tokenizer to train in `precision` (training_precision): the newest checkpoint in `out_dir` if
    any, else `base_path`."""
    resume = last_checkpoint(out_dir)
    on_cuda = lm.cuda_available()
    dtype = training_precision(precision, on_cuda)[0]
    return (*lm.load_model(resume or base_path, dtype=dtype, on_cuda=on_cuda), resume)


def run_sft(base_model, out_dir, settings, encode_examples, desc):
    """Train `base_model` into `out_dir` on `encode_examples(tokenizer)`, resuming, unless already done."""
    if training_done(out_dir):
        log.info("%s: %s is already trained (training_complete.json); delete it to retrain", desc, out_dir)
        return None
    model, tokenizer, resume = load_for_training(base_model, out_dir, settings.precision)
    return train_sft(model, tokenizer, encode_examples(tokenizer), out_dir, settings, resume_from=resume, desc=desc)
