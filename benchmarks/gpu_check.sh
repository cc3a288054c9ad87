#!/usr/bin/env bash
# The GPU working point and the GPU paths in one device call: <= 5 minutes on a fresh
# H100/H200 machine (python 3.12, torch 2.11, nothing installed), data preparation included.
#
#   OUT=$OUT bash benchmarks/gpu_check.sh     # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --toy        # every section at toy size on CPU (< 2 minutes)
#
# Needs only what a GPU node has (torch, torchvision, numpy, pillow, pyarrow, typer, rich,
# pyyaml) and the shard codecs' wheels: the code runs from the checkout (PYTHONPATH), no
# install. A machine without zstandard / xxhash / pyspng and without a network installs them
# from .gpu_data/wheels (fill it here, then carry it:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu_data/wheels zstandard==0.25.0 xxhash pyspng
# ). CamVid frames are read from .gpu_data/camvid (copy ../shared/data/camvid there and carry
# it) or ../shared/data/camvid.
#
# What comes back: $OUT/gpu_check.md (the table), $OUT/gpu_check.tar.gz (every section's
# output: JSON, logs) and $OUT/gpu_check.log (this script's output). Sections run in order of
# what matters most and each has its own time limit; a section that would start past the
# budget (BUDGET_S, default 285 s) is skipped and the table says so.
#
# One compile serves every compiled section: the step benchmark, the loader benchmark and
# `seg train` run the same model and loss (R-50 DeepLabV3+ OS16, plain cross-entropy, bf16,
# 512x1024 crops, batch 8), so inductor's cache (TORCHINDUCTOR_CACHE_DIR) hits after the first.
set -u
cd "$(dirname "$0")/.."
TOY=0; [ "${1:-}" = "--toy" ] && TOY=1
SLACK=${SLACK:-1}; [ $TOY = 1 ] && SLACK=${SLACK_TOY:-4}  # time limits x SLACK (a busy CPU)
OUT=${OUT:-/tmp/gpu_check}; WORK=${WORK:-/tmp/gpu_check_work}
R=$WORK/report  # every section's files; archived into $OUT at the end
rm -rf "$R"; mkdir -p "$OUT" "$R"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
SEG=("$PY" -m stages.cli)  # `seg`, from this checkout
BUDGET_S=${BUDGET_S:-285}
exec > >(tee "$OUT/gpu_check.log") 2>&1
log() { echo "== $(date +%T) [${SECONDS}s] $*"; }
# section NAME SECONDS: false (skip) when the section could end past the budget
section() {
  if [ $((SECONDS + $2)) -gt "$BUDGET_S" ] && [ $TOY = 0 ]; then
    echo "$1: skipped (budget)" >> "$R/skipped.txt"; log "skip $1 (budget)"; return 1
  fi
  log "$1"; return 0
}
CAMVID=.gpu_data/camvid; [ -d "$CAMVID" ] || CAMVID=../shared/data/camvid
NCPU=$(nproc); WORKERS=$(( NCPU > 2 ? NCPU - 2 : 1 ))

if [ $TOY = 1 ]; then   # CPU, seconds: every section runs, the figures mean nothing
  H=64; W=128; NTRAIN=8; NVAL=4; CROP="32 64"; BATCH=2; STEPS=2; WARM=1; ITERS=4; LOGN=2
  BACKBONE=mobilenet_v3_large; DEV=(-S train.device=cpu -S evaluate.device=cpu)
  BENCH_DEV=(--device cpu --no-compile); SB=(--device cpu --crop 32 64 --batch 2 --steps 1 --backend eager)
  OHEM=(--device cpu --shape 2 64 128 --k 1000 --repeats 2); FP16=(--amp off); RDEV=cpu
  CV_CROP="32 48"; CV_BATCH=2; CV_N=6; EVAL_BATCH=2; WORKERS=1
else
  H=1024; W=2048; NTRAIN=24; NVAL=16; CROP="512 1024"; BATCH=8; STEPS=10; WARM=3; ITERS=40
  LOGN=10; BACKBONE=resnet50; DEV=(); BENCH_DEV=(); SB=(--crop 512 1024 --batch 4 --steps 5)
  OHEM=(); FP16=(--amp fp16 --no-compile); RDEV=cuda
  CV_CROP="360 480"; CV_BATCH=16; CV_N=0; EVAL_BATCH=8
fi
read -r CH CW <<< "$CROP"; read -r CVH CVW <<< "$CV_CROP"
# the model and loss of every compiled section (the step benchmark's: SegLoss, no weights)
MODEL=(-S train.model.arch=deeplabv3plus -S train.model.backbone=$BACKBONE -S train.model.output_stride=16
       -S train.model.separable_head=false -S train.model.aux_head=false -S train.class_weights=null
       -S "train.loss={ce: 1.0}" -S train.label_smoothing=0.0 -S train.ohem=false -S train.amp=auto)
BENCH=("$PY" benchmarks/train_throughput.py --backbone $BACKBONE "${BENCH_DEV[@]}" --crop $CROP --batch $BATCH)

if ! "$PY" -c "import zstandard, xxhash" 2>/dev/null; then  # the shard codecs (pyproject's core)
  if [ -d .gpu_data/wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .gpu_data/wheels zstandard xxhash pyspng \
      || echo "installing the codec wheels from .gpu_data/wheels failed" >> "$R/errors.txt"
  else
    echo "no zstandard/xxhash and no .gpu_data/wheels: preprocess and the readers will fail" >> "$R/errors.txt"
  fi
fi
log "machine and /dev/shm"
{ nvidia-smi -L 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  echo "cpus $NCPU"; df -B1 --output=size,avail /dev/shm | tail -1 | awk '{print "shm_bytes", $1, "free", $2}'
} | tee "$R/machine.txt"
# the loader keeps 4 batches per worker in /dev/shm: 1024x2048 x 4 bytes x 8 = 64 MiB a batch
SHM_FREE=$(df -B1 --output=avail /dev/shm | tail -1); NEED=$(( WORKERS * 4 * BATCH * H * W * 4 ))
if [ "$SHM_FREE" -lt "$NEED" ]; then
  WORKERS=$(( SHM_FREE / (4 * BATCH * H * W * 4) )); [ $WORKERS -lt 1 ] && WORKERS=1
  echo "/dev/shm: $SHM_FREE bytes free < $NEED needed; loader workers cut to $WORKERS" | tee -a "$R/errors.txt"
fi
echo "workers $WORKERS" >> "$R/machine.txt"

# Data, on the CPU, while the GPU-only sections run: at least one shard per loader worker.
PER_SHARD=$(( NTRAIN / WORKERS )); [ $PER_SHARD -lt 1 ] && PER_SHARD=1
(
  timeout $((150 * SLACK)) "${SEG[@]}" synth "$WORK/synth" --train $NTRAIN --val $NVAL --height $H --width $W --overwrite --workers 0 >/dev/null
  for split in train val; do
    timeout $((60 * SLACK)) "${SEG[@]}" preprocess "$WORK/synth" $split "$WORK/shards/$split" --samples-per-shard $PER_SHARD --workers 0 --overwrite >/dev/null
  done
  if [ -d "$CAMVID" ]; then
    # 1024x2048 mosaics of CamVid photos (benchmarks/data_path.py), as PNG shards (the
    # source's bytes, today's) and zstd shards (the Cityscapes recipe's): the codec section
    NMOSAIC=$NTRAIN; [ $TOY = 1 ] && NMOSAIC=4
    MPER=$(( NMOSAIC / WORKERS )); [ $MPER -lt 1 ] && MPER=1
    timeout $((120 * SLACK)) "$PY" benchmarks/data_path.py --make-root "$WORK/mosaic" --frames $NMOSAIC --camvid "$CAMVID" \
      || echo "mosaic: data_path.py --make-root failed" >> "$R/errors.txt"
    for fmt in png zstd; do
      timeout $((90 * SLACK)) "${SEG[@]}" preprocess "$WORK/mosaic" train "$WORK/mosaic_shards/$fmt" --image-format $fmt \
        --samples-per-shard $MPER --workers 0 --overwrite >/dev/null || echo "mosaic $fmt: preprocess failed" >> "$R/errors.txt"
    done
    CVROOT=$CAMVID
    if [ $CV_N -gt 0 ]; then  # toy: a few frames of each split
      CVROOT=$WORK/camvid_toy; rm -rf "$CVROOT"
      for d in train trainannot val valannot; do mkdir -p "$CVROOT/$d"; done
      for f in $(ls "$CAMVID/train" | head -$CV_N); do s=${f%.*}; cp "$CAMVID/train/$f" "$CVROOT/train/"; cp "$CAMVID/trainannot/$s.png" "$CVROOT/trainannot/"; done
      for f in $(ls "$CAMVID/val" | head -$CV_N); do s=${f%.*}; cp "$CAMVID/val/$f" "$CVROOT/val/"; cp "$CAMVID/valannot/$s.png" "$CVROOT/valannot/"; done
    fi
    CV_PER_SHARD=$(( 367 / WORKERS )); [ $CV_N -gt 0 ] && CV_PER_SHARD=1
    for split in train val; do
      timeout $((60 * SLACK)) "${SEG[@]}" preprocess "$CVROOT" $split "$WORK/camvid/$split" --dataset camvid --samples-per-shard $CV_PER_SHARD --workers 0 --overwrite >/dev/null \
        || echo "CamVid $split: preprocess failed" >> "$R/errors.txt"
    done
  fi
) > "$R/data.txt" 2>&1 &
DATA_PID=$!

if section "OHEM threshold: kthvalue vs sort vs topk" 20; then
  timeout $((30 * SLACK)) "$PY" benchmarks/ohem_threshold.py "${OHEM[@]}" --json "$R/ohem.json" > "$R/ohem.txt" 2>&1
fi
if section "step: plain fp32 eager vs ours (the one compile)" 150; then
  timeout $((170 * SLACK)) "${BENCH[@]}" --steps $STEPS --warmup $WARM --json "$R/step.json" > "$R/step.txt" 2>&1
fi
if section "step: forced fp16 + GradScaler (fused SGD), eager" 40; then
  timeout $((50 * SLACK)) "${BENCH[@]}" --configs ours "${FP16[@]}" --steps $STEPS --warmup $WARM --json "$R/step_fp16.json" > "$R/step_fp16.txt" 2>&1
fi
if section "SyncBN over 2 processes on one GPU: eager vs compiled, graph breaks, host syncs" 75; then
  timeout $((90 * SLACK)) "$PY" benchmarks/syncbn_check.py --backbone $BACKBONE "${SB[@]}" --json "$R/syncbn.json" > "$R/syncbn.txt" 2>&1
fi
log "waiting for the data"; wait $DATA_PID; cat "$R/data.txt"

mkdir -p "$WORK/proj"; cp params.yaml "$WORK/proj/params.yaml"
P=(--params "$WORK/proj/params.yaml" -S "data.shards=$WORK/shards" -S "data.outputs=$WORK/out")
TRAIN=(-S "train.crop_size=[$CH,$CW]" -S train.batch_size=$BATCH -S train.workers=$WORKERS
       -S train.warmup_iters=0 -S evaluate.batch_size=$EVAL_BATCH -S evaluate.workers=$WORKERS)

if section "seg train: the loop on synthetic ${H}x${W} shards (compiled: the cache hits)" 60; then
  timeout $((75 * SLACK)) "${SEG[@]}" train "${P[@]}" "${MODEL[@]}" "${DEV[@]}" "${TRAIN[@]}" -S train.iterations=$ITERS \
    -S train.log_every=$LOGN -S train.val_interval=$ITERS -S train.checkpoint_interval=$ITERS > "$R/train_synth.txt" 2>&1 \
    || echo "seg train (synthetic) failed: see train_synth.txt" >> "$R/errors.txt"
  cp "$WORK/out/train/train_log.jsonl" "$R/train_synth_log.jsonl" 2>/dev/null \
    || cp "$WORK/out/train/dvclive/plots/metrics/train/images_per_s.tsv" "$R/train_synth_images_per_s.tsv" 2>/dev/null
fi
for what in "whole 1.0" "slide 1.0" "whole 1.0,1.25"; do
  read -r mode scales <<< "$what"; name=eval_${mode}_${scales//[.,]/_}
  if section "seg eval $mode, scales [$scales]: full resolution ${H}x${W}, batch $EVAL_BATCH" 25; then
    timeout $((40 * SLACK)) "${SEG[@]}" eval "${P[@]}" "${DEV[@]}" -S evaluate.mode=$mode -S "evaluate.scales=[$scales]" \
      -S evaluate.batch_size=$EVAL_BATCH -S evaluate.workers=$WORKERS --out "$WORK/$name" > "$R/$name.txt" 2>&1 \
      && cp "$WORK/$name/metrics.json" "$R/$name.json" \
      || echo "seg eval $mode [$scales] failed: see $name.txt" >> "$R/errors.txt"
  fi
done
if section "seg train --gpus 1 with os8_from: OS16 -> OS8 under DDP, BN frozen" 45; then
  NCCL_DEV=(); [ $TOY = 1 ] && NCCL_DEV=(-S train.device=cpu)
  timeout $((60 * SLACK)) "${SEG[@]}" train --gpus 1 "${P[@]}" "${MODEL[@]}" "${NCCL_DEV[@]}" "${TRAIN[@]}" -S "data.outputs=$WORK/out_os8" \
    -S train.iterations=8 -S train.os8_from=4 -S train.log_every=2 -S train.val_interval=8 -S train.compile=false \
    > "$R/train_gpus1_os8.txt" 2>&1; echo $? > "$R/train_gpus1_os8.rc"
fi
if section "a CPU-made checkpoint resumed on CUDA (fused SGD, channels-last)" 45; then
  # 2 of 4 steps on the CPU (NCHW momentum buffers), then the rest on the device
  SMALL=(-S train.model.backbone=mobilenet_v3_large -S "train.crop_size=[128,128]" -S train.batch_size=2
         -S train.workers=0 -S train.warmup_iters=0 -S train.val_interval=100 -S train.log_every=1
         -S train.checkpoint_interval=2 -S train.iterations=4 -S train.amp=auto -S "data.outputs=$WORK/out_resume")
  timeout $((40 * SLACK)) "$PY" - "$WORK/proj/params.yaml" "data.shards=$WORK/shards" "${SMALL[@]}" -S train.device=cpu \
    > "$R/resume_cpu.txt" 2>&1 <<'PY'
import sys
from stages import steps
args = sys.argv[1:]
steps.train(steps.load(args[0], [a for a in args[1:] if a != "-S"]), stop_after=2)
print("stopped at step 2 on the CPU")
PY
  timeout $((40 * SLACK)) "${SEG[@]}" train --resume "${P[@]}" "${SMALL[@]}" -S train.device=$RDEV > "$R/resume_cuda.txt" 2>&1
  echo $? > "$R/resume_cuda.rc"
fi
if section "loader: our step fed by $WORKERS decode workers, synthetic ${H}x${W} shards" 45; then
  timeout $((60 * SLACK)) "${BENCH[@]}" --mode loader --steps $STEPS --warmup $WARM --shards "$WORK/shards/train" \
    --workers $WORKERS --json "$R/loader_synth.json" > "$R/loader_synth.txt" 2>&1
fi
for fmt in png zstd; do
  if [ -d "$WORK/mosaic_shards/$fmt" ] && section "loader-fed step on 1024x2048 photo mosaics, $fmt shards, $WORKERS workers" 40; then
    timeout $((60 * SLACK)) "${BENCH[@]}" --mode loader --steps $STEPS --warmup $WARM --shards "$WORK/mosaic_shards/$fmt" \
      --workers $WORKERS --json "$R/loader_mosaic_$fmt.json" > "$R/loader_mosaic_$fmt.txt" 2>&1
  fi
done
if [ -d "$WORK/camvid/train" ] && section "CamVid ${CVH}x${CVW}, batch $CV_BATCH: step fed by the loader vs resident (uncompiled)" 40; then
  timeout $((50 * SLACK)) "$PY" benchmarks/train_throughput.py --mode loader --backbone $BACKBONE "${BENCH_DEV[@]}" \
    --no-compile --num-classes 11 --crop $CV_CROP --batch $CV_BATCH --steps $STEPS --warmup $WARM \
    --shards "$WORK/camvid/train" --workers $WORKERS --json "$R/loader_camvid.json" > "$R/loader_camvid.txt" 2>&1
fi
if [ $TOY = 0 ] && section "host syncs per step in the loop (torch.cuda sync debug mode)" 60; then
  timeout $((75 * SLACK)) "$PY" benchmarks/sync_check.py --params "$WORK/proj/params.yaml" -S "data.shards=$WORK/shards" \
    -S train.model.backbone=mobilenet_v3_large -S "train.crop_size=[256,512]" -S train.batch_size=4 \
    -S train.workers=4 -S train.compile=false -S evaluate.batch_size=4 --json "$R/sync.json" > "$R/sync.txt" 2>&1
fi

log "report"
"$PY" benchmarks/gpu_report.py "$R" > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" report
log "done in ${SECONDS}s"
