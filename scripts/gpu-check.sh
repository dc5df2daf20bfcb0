#!/usr/bin/env bash
# The GPU check (issue 18 item 5), for a CUDA machine; CI never runs it.
#
#   scripts/gpu-check.sh [OUT]        (OUT defaults to ./gpu-check-out)
#
# 1. a venv under OUT with the CUDA torch wheel and harvest (editable, from this checkout);
# 2. a random model of realistic shape: Llama architecture, hidden 2048, 16 layers, 16 heads
#    (8 KV heads), a 32k vocab, saved in bf16 (0.89B parameters, 1.8 GB);
# 3. greedy equality of the engine with transformers' own generate on CUDA, in float32 (must
#    match token for token) and in bf16 (the share of equal sequences is reported: kernels
#    differ and bf16 ties flip);
# 4. the engine's start-up step-latency profile on that device (OUT/profile.json);
# 5. `harvest bench engine` and 6. `harvest bench coserve` on CUDA with that model.
# Each step has its own timeout; all of it is meant to take under 8 minutes. Results:
# OUT/greedy.json, OUT/profile.json, OUT/engine/engine.json, OUT/coserve/coserve.json, OUT/log.txt.
#
# Overrides, for a dry run on CPU or a machine with its own setup:
#   GPU_CHECK_PYTHON=/path/to/python  use this interpreter, no venv or installs
#   GPU_CHECK_DEVICE=cpu              device (default cuda)
#   GPU_CHECK_SHAPE="64 2 4 512"      hidden, layers, heads, vocab (default "2048 16 16 32000")
#   TORCH_INDEX_URL=...               the torch wheel index (default CUDA 12.4 wheels)
set -euo pipefail

OUT=$(realpath -m "${1:-./gpu-check-out}")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
read -r HIDDEN LAYERS HEADS VOCAB <<<"${GPU_CHECK_SHAPE:-2048 16 16 32000}"
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu124}
mkdir -p "$OUT"
START=$SECONDS

log() { echo "[gpu-check +$((SECONDS - START))s] $*" | tee -a "$OUT/log.txt"; }

# step NAME SECONDS CMD...: runs CMD under a timeout, logs its outcome, keeps going on failure
FAILED=()
step() {
    local name=$1 limit=$2
    shift 2
    log "$name: start (timeout ${limit}s)"
    if timeout "$limit" "$@" > >(tee -a "$OUT/log.txt") 2>&1; then
        log "$name: ok"
    else
        log "$name: FAILED (exit $?)"
        FAILED+=("$name")
    fi
}

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
fi

if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then
    PY=$GPU_CHECK_PYTHON
else
    log "venv: $OUT/venv"
    python3 -m venv "$OUT/venv"
    PY=$OUT/venv/bin/python
    timeout 300 "$PY" -m pip install -q --upgrade pip
    timeout 300 "$PY" -m pip install -q torch --index-url "$TORCH_INDEX_URL"
    timeout 300 "$PY" -m pip install -q -e "$ROOT"
fi
cd "$ROOT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/log.txt"
if [[ $DEVICE == cuda* ]]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
fi

HARVEST=("$PY" -c "from harvest.cli import app; app()")  # the `harvest` command of that Python
MODEL=$OUT/model
step model 180 "$PY" - "$MODEL" "$DEVICE" "$HIDDEN" "$LAYERS" "$HEADS" "$VOCAB" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from harvest.models.tiny import build_config, build_tokenizer

out, device, hidden, layers, heads, vocab = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
config = build_config("llama", vocab, hidden, layers, heads, max_len=4096)
config.intermediate_size = int(hidden * 2.75)  # Llama's MLP ratio (2048 -> 5632)
config.initializer_range = 0.02  # a realistic init: at 0.1 a deep model's activations blow up
torch.manual_seed(0)
with torch.device(device):  # initialised where it runs: a billion parameters init slowly on CPU
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out)
# the tokenizer covers only the corpus' few hundred tokens; the bench prompts are token ids
build_tokenizer(512).save_pretrained(out)
params = sum(p.numel() for p in model.parameters())
print(f"model: {params / 1e9:.2f}B parameters, {hidden=} {layers=} {heads=} {vocab=}, bf16, in {out}")
EOF

step greedy 180 "$PY" - "$MODEL" "$DEVICE" "$OUT/greedy.json" <<'EOF'
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from harvest.engine import Engine, SamplingParams

model_dir, device, out = sys.argv[1:]
MAX_TOKENS = 32
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 19, 33, 64, 101, 250)]
report = {"device": device, "max_tokens": MAX_TOKENS, "prompt_lens": [len(p) for p in prompts]}
for dtype in ("float32", "bfloat16"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    expected = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out_ids[0, len(p):].tolist())
    del model
    # equality only: the start-up latency profile is not needed
    engine = Engine.from_pretrained(model_dir, device=device, dtype=dtype, profile_latency=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in engine.generate(prompts, params)]
    del engine
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    prefix = [next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(e)) for g, e in zip(got, expected)]
    report[dtype] = {
        "equal_sequences": sum(g == e for g, e in zip(got, expected)),
        "sequences": len(prompts),
        "common_prefix_tokens": prefix,
        "distinct_outputs": len({tuple(e) for e in expected}),
    }
    print(dtype, report[dtype])
with open(out, "w") as f:
    json.dump(report, f, indent=2)
f32 = report["float32"]
sys.exit(0 if f32["equal_sequences"] == f32["sequences"] else "float32 greedy outputs differ from transformers")
EOF

step "step profile" 120 "$PY" - "$MODEL" "$DEVICE" "$OUT/profile.json" <<'EOF'
# the step times the engine profiles at start-up on this device, in bf16 with 64 sequences and
# 512 tokens a step: what the simulated GPU profiles (harvest/engine/sim_profile.py) stand in for
import json
import sys

from harvest.engine import Engine
from harvest.engine.latency_model import NUM_FEATURES

model_dir, device, out = sys.argv[1:]
engine = Engine.from_pretrained(model_dir, device=device, dtype="bfloat16", max_num_seqs=64)
names = ["constant", "tokens", "decodes", "chunks", "padded_decode_context_k", "prefill_attention_k"]
samples = [dict(zip(names, f), seconds=t) for f, t in engine.latency.profile_samples]
weights = dict(zip(names, engine.latency.weights[:NUM_FEATURES]))
with open(out, "w") as f:
    json.dump({"device": device, "dtype": "bfloat16", "weights_s": weights, "samples": samples}, f, indent=2)
for s in samples:
    print({k: round(v, 5) for k, v in s.items()})
print("fitted weights (s):", weights)
EOF

step "bench engine" 150 "${HARVEST[@]}" bench engine --quick --model "$MODEL" --device "$DEVICE" --out "$OUT/engine"
step "bench coserve" 180 "${HARVEST[@]}" bench coserve --quick --model "$MODEL" --device "$DEVICE" --out "$OUT/coserve"

log "done in $((SECONDS - START)) s; failed: ${FAILED[*]:-none}"
[[ ${#FAILED[@]} -eq 0 ]]
