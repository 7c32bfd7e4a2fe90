#!/usr/bin/env bash
# One prepared training run for a lent CUDA machine (after gpu_check.sh, in what is left of the lease): the
# task-table models furthest below their bars (layout, sr, class; issue 19), fine-tuned from the bundled text
# model's UNet with the gpu preset (batch 512, bf16 autocast) for SECONDS each, exported in fp16. TASKS may
# also name `views` (issue 24's view model: N_TRAIN pairs; its LoRA adapter over the inpainting UNet, and its
# camera token) and `views-decoder` (its decoder adapter over the VAE, vae-views). Writes the task folders and
# the training logs to $OUT as two tarballs (the device tool returns at most 8 files).
#   bash benchmarks/gpu_train.sh [SECONDS per task, default 90] [N_TRAIN scenes, default 60000] [TASKS]
# Locally: install with `tar xzf tasks-model.tar.gz -C lab/models/shapes` after `python -m lab eval tasks
# --model DIR` says it is better than what is bundled.
set -uo pipefail
OUT=${OUT:-gpu-results}
S=${1:-90}; N=${2:-60000}; TASKS=${3:-layout,sr,class}
mkdir -p "$OUT"
start=$(date +%s)
source "$(dirname "$0")/_device_env.sh"
WORK=${WORK:-/tmp/gpu-train}; MODEL=${MODEL:-/tmp/gpu-train-model}
python3 - "$S" "$N" "$TASKS" "$WORK" "$MODEL" <<'PY' 2>&1 | tee "$OUT/train.log" | grep --line-buffered -vE "^\s|it/s\]$"
import sys, time
from dataclasses import replace
import torch
from lab.shapes.train import PRESETS, train
s, n, tasks, work, model = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
device = "cuda" if torch.cuda.is_available() else "cpu"
preset = replace(PRESETS["gpu" if device == "cuda" else "smoke"], n_train=n, unet_seconds=s, vae_seconds=s,
                 ckpt_every=0.0)
t0 = time.time()
rows = train(",".join(f"task-{t}" for t in tasks.split(",")), work, preset=preset, device=device,
             export_to=model, base="lab/models/shapes", two_share=0.75, progress=False)
print("rows", rows)
print(f"DONE {time.time() - t0:.0f} s on {device}")
PY
parts=""  # only the folders these tasks trained (the export also copies the base's)
for t in ${TASKS//,/ }; do
  if [ "$t" = views-decoder ]; then parts="$parts vae-views"; continue; fi  # the view model's decoder adapter
  parts="$parts unet-$t"
  [ -d "$MODEL/${t}_embedder" ] && parts="$parts ${t}_embedder"
  [ "$t" = sr ] && parts="$parts low_res_scheduler"  # the upscaler's noise augmentation
  [ "$t" = views ] && parts="$parts camera_embedder"  # the view model's camera token
done
tar czf "$OUT/tasks-model.tar.gz" -C "$MODEL" $parts
tar czf "$OUT/tasks-logs.tar.gz" -C "$WORK" logs
ls -la "$OUT"
echo "gpu_train: $(( $(date +%s) - start )) s"
