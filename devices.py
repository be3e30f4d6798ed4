"""GPUs for the generation launcher, found without initialising CUDA, and shards run on them in waves.

The launcher's devices are the entries of its CUDA_VISIBLE_DEVICES (a scheduler's allocation, or
GPUs the user reserved), else every GPU that `nvidia-smi -L` lists. A vLLM engine reserves most of
a GPU's memory, so each GPU is one slot (one shard process at a time) unless a memory fraction per
engine packs floor(1 / fraction) engines on it; shards beyond the slots wait for a free one.
Nothing here initialises CUDA: a process that did cannot hand CUDA to vLLM's forked workers.
The shard processes end with the launcher, however it ends (SIGTERM, Ctrl-C, SIGKILL on Linux).
"""
import ctypes
import functools
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("devices")

ENV = "CUDA_VISIBLE_DEVICES"
NO_DEVICES = {"", "-1"}  # values that hide every GPU
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_WAIT_S = 10  # seconds a stopped shard process gets to exit before it is killed


class DeviceError(ValueError):
    pass


def parse_smi_list(text):
    """Device names from `nvidia-smi -L` output: each GPU's index and UUID, each MIG instance's UUID."""
    names = []
    for line in text.splitlines():
        if m := re.match(r"\s*GPU (\d+):.*\(UUID: (GPU-[^)\s]+)\)", line):
            names.append((m.group(1), m.group(2)))
        elif m := re.match(r"\s*MIG .*\(UUID: (MIG-[^)\s]+)\)", line):
            names.append((None, m.group(1)))
    return names


def machine_gpus():
    """(index, uuid) of every GPU and MIG instance on this machine, or None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    run = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        # nvidia-smi present but no working driver: the same as no GPU for the launcher.
        log.warning("nvidia-smi -L failed (%s); assuming no GPU", (run.stderr or run.stdout).strip()[:200])
        return []
    return parse_smi_list(run.stdout)


def parse_visible(value, gpus):
    """The devices a CUDA_VISIBLE_DEVICES value names, checked against `gpus` ((index, uuid) pairs, or
    None when they cannot be listed); `value` None means every GPU. Raises DeviceError for names that
    do not exist or repeat."""
    if value is None:
        return [index for index, _ in gpus or [] if index is not None]
    if value.strip() in NO_DEVICES:
        return []
    entries = [e.strip() for e in value.split(",")]
    if gpus is None:
        return entries
    indices = {index for index, _ in gpus if index is not None}
    uuids = [uuid for _, uuid in gpus]
    # CUDA accepts a unique prefix of a UUID.
    known = [e for e in entries if e in indices or (e[:4] in ("GPU-", "MIG-") and any(u.startswith(e) for u in uuids))]
    bad = [e for e in entries if e not in known]
    if bad:
        have = ", ".join(sorted(indices, key=int)) or "none"
        raise DeviceError(f"{ENV}={value!r} names device(s) {', '.join(map(repr, bad))} that do not exist on this "
                          f"machine; it has GPU(s) {have} (UUIDs: nvidia-smi -L)")
    repeated = sorted({e for e in entries if entries.count(e) > 1})
    if repeated:
        raise DeviceError(f"{ENV}={value!r} names device(s) {', '.join(repeated)} more than once")
    return entries


def visible_devices(environ=None):
    """This launcher's GPUs: its CUDA_VISIBLE_DEVICES checked against the machine, else all of them."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV)
    gpus = machine_gpus()
    if gpus is None and value is None:
        return [str(i) for i in range(nvml_gpu_count())]
    if gpus is None:
        log.info("no nvidia-smi: using %s=%s unchecked", ENV, value)
    return parse_visible(value, gpus)


def nvml_gpu_count():
    """GPUs this process may use, counted through NVML: torch.cuda.device_count() does not
    initialise CUDA when NVML answers (it falls back to the CUDA runtime only when NVML fails)."""
    import torch

    return torch.cuda.device_count()


def gpu_available():
    """Whether this process has a GPU, without initialising CUDA (safe before vLLM starts)."""
    return nvml_gpu_count() > 0


def slots_per_device(memory_fraction):
    """Engines one GPU holds: 1 when unset, else floor(1 / fraction) of its memory each."""
    if memory_fraction is None:
        return 1
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"GPU_MEMORY_UTILIZATION={memory_fraction}: must be in (0, 1] (or None: one engine per GPU)")
    return max(1, math.floor(1 / memory_fraction + 1e-9))


def device_slots(devices, per_device=1, n_shards=1):
    """One entry per concurrent shard process, cycling over the devices so the first wave spreads
    out; without a GPU, `n_shards` CPU slots (None) that share the cores."""
    if not devices:
        return [None] * max(1, n_shards)
    return [device for _ in range(per_device) for device in devices]


def assign_shards(n_shards, devices, per_device=1):
    """Shards 0..n_shards-1 on `devices` as the launcher runs them when every shard takes as long:
    a list of waves, each a list of (pid, device)."""
    slots = device_slots(devices, per_device, n_shards)
    pids = list(range(n_shards))
    return [list(zip(pids[start:start + len(slots)], slots)) for start in range(0, n_shards, len(slots))]


def _die_with(parent):
    """In a new child (before exec): have the kernel send it SIGTERM when the thread that started it
    ends, even by SIGKILL."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def start_child(cmd, **kwargs):
    """subprocess.Popen(cmd, **kwargs) of a process that ends when this one ends (Linux: the parent
    death signal, so call it from the thread that lives as long as the launcher, the main one)."""
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = functools.partial(_die_with, os.getpid())
    return subprocess.Popen(cmd, **kwargs)


def stop(procs, wait_s=STOP_WAIT_S):
    """Terminate the processes still running, then kill those that outlive `wait_s` seconds."""
    alive = [p for p in procs if p.poll() is None]
    if alive:
        log.warning("stopping %d shard process(es)", len(alive))
    for proc in alive:
        proc.terminate()
    deadline = time.time() + wait_s
    for proc in alive:
        try:
            proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_in_slots(jobs, slots, start, on_done=None, poll_s=0.5):
    """Run every job, each slot holding one at a time: `start(job, device)` returns a started
    subprocess.Popen and the next job takes the first slot that frees. `on_done(job, code)` is
    called as each one ends. Returns {job: exit code}. If this ends early (an error, Ctrl-C, SIGTERM),
    the running processes are stopped first."""
    if not slots:
        raise ValueError("no slot to run shards in")
    queue, free, running, codes = list(jobs), list(slots), {}, {}
    main = threading.current_thread() is threading.main_thread()  # signal handlers: the main thread only
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        while queue or running:
            while queue and free:
                job, device = queue.pop(0), free.pop(0)
                running[start(job, device)] = (job, device)
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                job, device = running.pop(proc)
                codes[job] = proc.returncode
                free.insert(0, device)
                if on_done:
                    on_done(job, proc.returncode)
    finally:
        stop(running)
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return codes
