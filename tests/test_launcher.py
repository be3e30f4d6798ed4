"""The generation launcher: visible devices, device slots and waves, node ranges, merging, bad input.
Shard processes are cheap stand-ins (a few lines of Python) run on fake device lists."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

import devices
import mair_config as mc
import shards
from file_io import read_jsonl, write_jsonl

SMI = """GPU 0: NVIDIA H200 (UUID: GPU-aaaa1111-0000)
GPU 1: NVIDIA H200 (UUID: GPU-bbbb2222-0000)
  MIG 3g.71gb     Device  0: (UUID: MIG-cccc3333-0000)
"""
EIGHT_GPUS = [(str(i), f"GPU-{i}{i}{i}{i}") for i in range(8)]

# A shard process stand-in: writes its documents' rows (with the device it saw and when it ran)
# to the shard file after a short sleep; exits 3 when a `fail-<pid>` file is in its output folder.
FAKE_SHARD = r"""
import json, os, sys, time
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1]
pid, total = int(flag("-pid")), int(flag("-total_num"))
out = next(a.split("=", 1)[1] for a in argv if a.startswith("--OUT="))
if os.path.exists(os.path.join(out, f"fail-{pid}")):
    sys.exit(3)
t0 = time.time()
time.sleep(0.3)
docs = [json.loads(line) for line in open(flag("-docs_path"))][pid::total]
path = os.path.join(out, flag("-data_name"), f"title-{pid}-{total}.jsonl")
os.makedirs(os.path.dirname(path), exist_ok=True)
seen = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "VLLM_WORKER_MULTIPROC_METHOD")}
with open(path, "w") as f:
    for d in docs:
        f.write(json.dumps({"id": d["id"], "gist": "g", "pid": pid, "t0": t0, "t1": time.time(), **seen}) + "\n")
"""


def test_devices_come_from_nvidia_smi_and_cuda_visible_devices():
    gpus = devices.parse_smi_list(SMI)
    assert gpus == [("0", "GPU-aaaa1111-0000"), ("1", "GPU-bbbb2222-0000"), (None, "MIG-cccc3333-0000")]
    assert devices.parse_visible(None, gpus) == ["0", "1"]
    assert devices.parse_visible("1", gpus) == ["1"]
    assert devices.parse_visible(" 1, 0 ", gpus) == ["1", "0"]
    assert devices.parse_visible("GPU-bbbb2222,MIG-cccc3333-0000", gpus) == ["GPU-bbbb2222", "MIG-cccc3333-0000"]
    assert devices.parse_visible("", gpus) == devices.parse_visible("-1", gpus) == []
    assert devices.parse_visible("5,7", None) == ["5", "7"]  # no nvidia-smi: taken as given
    with pytest.raises(devices.DeviceError, match=r"CUDA_VISIBLE_DEVICES='0,3,GPU-zz'.*'3', 'GPU-zz'.*GPU\(s\) 0, 1"):
        devices.parse_visible("0,3,GPU-zz", gpus)
    with pytest.raises(devices.DeviceError, match="names device.* 1 more than once"):
        devices.parse_visible("1,1", gpus)


def test_visible_devices_reads_the_launchers_environment(monkeypatch):
    monkeypatch.setattr(devices, "machine_gpus", lambda: EIGHT_GPUS)
    assert devices.visible_devices({}) == [str(i) for i in range(8)]
    assert devices.visible_devices({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ["4", "5", "6", "7"]
    monkeypatch.setattr(devices, "machine_gpus", lambda: None)
    monkeypatch.setattr(devices, "nvml_gpu_count", lambda: 2)
    assert devices.visible_devices({}) == ["0", "1"]


def test_gpu_check_does_not_initialise_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch.cuda.is_available() called"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert devices.gpu_available()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert not devices.gpu_available()


def test_slots_and_waves():
    assert devices.slots_per_device(None) == 1
    assert [devices.slots_per_device(f) for f in (1.0, 0.5, 0.3, 0.25, 0.1)] == [1, 2, 3, 4, 10]
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="GPU_MEMORY_UTILIZATION"):
            devices.slots_per_device(bad)
    assert devices.device_slots(["5", "7"]) == ["5", "7"]
    assert devices.device_slots(["5", "7"], 2) == ["5", "7", "5", "7"]
    assert devices.device_slots([], 1, 3) == [None, None, None]  # CPU: every shard at once
    assert devices.assign_shards(2, []) == [[(0, None), (1, None)]]
    assert devices.assign_shards(5, ["0", "1"]) == [[(0, "0"), (1, "1")], [(2, "0"), (3, "1")], [(4, "0")]]
    assert devices.assign_shards(5, ["5", "7"], 2) == [[(0, "5"), (1, "7"), (2, "5"), (3, "7")], [(4, "5")]]
    assert devices.assign_shards(3, ["0", "1"], 2) == [[(0, "0"), (1, "1"), (2, "0")]]


def test_node_ranges_cover_every_document_once():
    docs = [{"id": str(i)} for i in range(23)]
    a, b = shards.node_pids(5, 0, 2), shards.node_pids(5, 3, None)
    assert (a, b) == ([0, 1, 2], [3, 4]) and shards.node_pids(5) == [0, 1, 2, 3, 4]
    covered = [d["id"] for pid in a + b for d in shards.shard_docs(docs, pid, 5)]
    assert sorted(covered, key=int) == [d["id"] for d in docs]
    for start, end in ((3, 5), (-1, None), (3, 2), (5, None)):
        with pytest.raises(ValueError, match=r"PID_START=.*PID_END=.*0\.\.4 \(TOTAL_NUM=5\)"):
            shards.node_pids(5, start, end)
    assert shards.pid_ranges([7, 0, 1, 2, 5]) == "0-2, 5, 7"


def _intervals(rows):
    by_shard = {}
    for r in rows:
        by_shard[r["pid"]] = (r["t0"], r["t1"], r["CUDA_VISIBLE_DEVICES"])
    return by_shard


def _max_overlap(spans):
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_run_in_slots_runs_one_process_per_device_at_a_time(tmp_path):
    log = tmp_path / "runs.jsonl"
    child = ("import json, os, sys, time; t0 = time.time(); time.sleep(0.2); "
             "open(sys.argv[1], 'a').write(json.dumps([sys.argv[2], os.environ['CUDA_VISIBLE_DEVICES'], t0, "
             "time.time()]) + '\\n'); sys.exit(int(sys.argv[2]) == 3)")
    ended = []

    def start(job, device):
        return subprocess.Popen([sys.executable, "-c", child, str(log), str(job)],
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": device})

    codes = devices.run_in_slots(range(5), ["5", "7"], start, on_done=lambda job, code: ended.append(job), poll_s=0.05)
    assert codes == {0: 0, 1: 0, 2: 0, 3: 1, 4: 0} and sorted(ended) == [0, 1, 2, 3, 4]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert {device for _, device, _, _ in runs} == {"5", "7"}
    for device in ("5", "7"):
        assert _max_overlap([(t0, t1) for _, d, t0, t1 in runs if d == device]) == 1


@pytest.fixture()
def launch_setup(tmp_path, monkeypatch):
    """A 23-document corpus, the fake shard script, launcher constants and a machine with 8 GPUs."""
    root, out = str(tmp_path / "data"), str(tmp_path / "out")
    docs = [{"id": f"d{i}", "doc": f"text {i}"} for i in range(23)]
    write_jsonl(docs, mc.corpus_docs_path("PyDoc-Net", root))
    script = tmp_path / "fake_shard.py"
    script.write_text(FAKE_SHARD)
    launch = shards.Launch(tasks=["PyDoc-Net"], total_num=5, pid_start=0, pid_end=None, merge_only=False,
                           gpu_memory_utilization=None, data_root=root, log_dir=str(tmp_path / "log"),
                           quality_docs=0, seed=0)
    monkeypatch.setattr(devices, "machine_gpus", lambda: EIGHT_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("the launcher initialised CUDA"))

    def run(**overrides):
        final_path = lambda corpus: os.path.join(out, corpus, "title.jsonl")  # noqa: E731
        settings = dataclasses.replace(launch, **{key.lower(): value for key, value in overrides.items()})
        return shards.launch_all(str(script), settings, [f"--OUT={out}"], final_path, 1, lambda r: r["id"])

    return types.SimpleNamespace(run=run, docs=docs, out=out, final=os.path.join(out, "PyDoc-Net", "title.jsonl"))


def test_launcher_uses_the_parent_allocation_in_waves_and_merges(launch_setup, caplog):
    with caplog.at_level(logging.INFO):
        assert launch_setup.run() == []
    assert "3 waves" in caplog.text and "GPU(s) 5, 7" in caplog.text
    rows = read_jsonl(launch_setup.final)
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in launch_setup.docs)
    spans = _intervals(rows)
    assert sorted(spans) == [0, 1, 2, 3, 4]
    assert {device for _, _, device in spans.values()} == {"5", "7"}  # never 0 / 1
    assert {r["VLLM_WORKER_MULTIPROC_METHOD"] for r in rows} == {"spawn"}
    for device in ("5", "7"):
        assert _max_overlap([(t0, t1) for t0, t1, d in spans.values() if d == device]) == 1


def test_memory_fraction_packs_engines_on_one_gpu(launch_setup, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    assert launch_setup.run(TOTAL_NUM=4, GPU_MEMORY_UTILIZATION=0.5) == []
    spans = _intervals(read_jsonl(launch_setup.final))
    assert {d for _, _, d in spans.values()} == {"6"}
    assert _max_overlap([(t0, t1) for t0, t1, _ in spans.values()]) == 2


def test_failed_shard_keeps_the_finished_ones_and_a_rerun_only_redoes_it(launch_setup, caplog):
    os.makedirs(launch_setup.out)
    open(os.path.join(launch_setup.out, "fail-3"), "w").close()
    assert launch_setup.run() == ["PyDoc-Net"]
    assert not os.path.exists(launch_setup.final)
    kept = [pid for pid in range(5) if os.path.exists(mc.shard_path(launch_setup.final, pid, 5))]
    assert kept == [0, 1, 2, 4]
    before = {pid: read_jsonl(mc.shard_path(launch_setup.final, pid, 5)) for pid in kept}
    os.remove(os.path.join(launch_setup.out, "fail-3"))
    with caplog.at_level(logging.INFO):
        assert launch_setup.run() == []
    assert "shard(s) 0-2, 4 already done, kept" in caplog.text
    rows = read_jsonl(launch_setup.final)
    assert all(r in rows for pid in kept for r in before[pid])
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in launch_setup.docs)


def test_two_nodes_run_their_ranges_and_any_node_merges(launch_setup, caplog):
    with caplog.at_level(logging.INFO):
        assert launch_setup.run(PID_END=2) == []
    assert not os.path.exists(launch_setup.final)
    assert "shard(s) 3-4 belong to other nodes" in caplog.text and "--MERGE_ONLY=True" in caplog.text
    with caplog.at_level(logging.ERROR):
        assert launch_setup.run(MERGE_ONLY=True) == ["PyDoc-Net"]
    assert "2 of 5 shards missing (pid 3-4" in caplog.text
    assert launch_setup.run(PID_START=3) == []
    assert not os.path.exists(launch_setup.final)
    assert launch_setup.run(MERGE_ONLY=True) == []
    rows = read_jsonl(launch_setup.final)
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in launch_setup.docs)
    assert len(rows) == len(launch_setup.docs)


def test_bad_launcher_settings_are_clear_errors(launch_setup, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,9")
    with pytest.raises(SystemExit, match=r"CUDA_VISIBLE_DEVICES='6,9' names device\(s\) '9'.*GPU\(s\) 0, 1, 2, 3, 4"):
        launch_setup.run()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with pytest.raises(SystemExit, match=r"PID_START=3, PID_END=7.*0\.\.4 \(TOTAL_NUM=5\)"):
        launch_setup.run(PID_START=3, PID_END=7)
    with pytest.raises(SystemExit, match="need an explicit TOTAL_NUM"):
        launch_setup.run(TOTAL_NUM=0, PID_START=2)
    with pytest.raises(SystemExit, match="GPU_MEMORY_UTILIZATION=1.5"):
        launch_setup.run(GPU_MEMORY_UTILIZATION=1.5)
    assert not os.path.exists(launch_setup.out)  # nothing ran
