#!/usr/bin/env bash
# The GPU working point in one run (issue 11): <= 6 minutes on a fresh H100/H200 machine.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --toy      # the same sections at toy size on CPU (rehearsal)
#
# Needs only what a GPU node has (torch, torchvision, numpy, pillow, pyarrow, typer, rich,
# pyyaml): the code runs from the checkout (PYTHONPATH), no install. CamVid frames are read
# from .gpu_data/camvid (copy ../shared/data/camvid there and carry it) or ../shared/data/camvid.
# Results: one JSON per section and the table gpu_check.md in $OUT (default /tmp/gpu_check).
# Every section has its own time limit, so one slow part cannot eat the others.
set -u
cd "$(dirname "$0")/.."
TOY=0; [ "${1:-}" = "--toy" ] && TOY=1
OUT=${OUT:-/tmp/gpu_check}; WORK=${WORK:-/tmp/gpu_check_work}
mkdir -p "$OUT" "$WORK"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor  # the loop's compile reuses the benchmark's
SEG=("$PY" -m stages.cli)  # `seg`, from this checkout
log() { echo "== $(date +%T) $*"; }
CAMVID=.gpu_data/camvid; [ -d "$CAMVID" ] || CAMVID=../shared/data/camvid
NCPU=$(nproc); WORKERS=$(( NCPU > 2 ? NCPU - 2 : 1 ))

if [ $TOY = 1 ]; then   # CPU, seconds: every section runs, the figures mean nothing
  H=64; W=128; NTRAIN=8; NVAL=4; CROP="32 64"; BATCH=2; STEPS=2; WARM=1; ITERS=4; LOGN=2
  MODEL=(-S train.model.backbone=mobilenet_v3_large); BENCH_MODEL=(--backbone mobilenet_v3_large)
  DEV=(-S train.device=cpu -S evaluate.device=cpu); BENCH_DEV=(--device cpu --no-compile)
  CV_CROP="32 48"; CV_BATCH=2; CV_N=6; EVAL_BATCH=2
else
  H=1024; W=2048; NTRAIN=96; NVAL=64; CROP="512 1024"; BATCH=8; STEPS=20; WARM=5; ITERS=80
  LOGN=20; MODEL=(-S train.model.backbone=resnet50); BENCH_MODEL=(--backbone resnet50)
  DEV=(); BENCH_DEV=(); CV_CROP="360 480"; CV_BATCH=16; CV_N=0; EVAL_BATCH=8
fi
read -r CH CW <<< "$CROP"; read -r CVH CVW <<< "$CV_CROP"

log "machine"
{ nvidia-smi -L 2>/dev/null || echo "no GPU"; "$PY" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.version.cuda)"; echo "cpus $NCPU"; } | tee "$OUT/machine.txt"

log "data: synthetic ${H}x${W} ($NTRAIN train, $NVAL val) and CamVid shards"
timeout 120 "${SEG[@]}" synth "$WORK/synth" --train $NTRAIN --val $NVAL --height $H --width $W --overwrite --workers 0 >/dev/null
for split in train val; do
  timeout 60 "${SEG[@]}" preprocess "$WORK/synth" $split "$WORK/shards/$split" --workers 0 --overwrite >/dev/null
done
if [ -d "$CAMVID" ]; then
  CVROOT=$CAMVID
  if [ $CV_N -gt 0 ]; then  # toy: a few frames of each split
    CVROOT=$WORK/camvid_toy; rm -rf "$CVROOT"
    for d in train trainannot val valannot; do mkdir -p "$CVROOT/$d"; done
    for f in $(ls "$CAMVID/train" | head -$CV_N); do s=${f%.*}; cp "$CAMVID/train/$f" "$CVROOT/train/"; cp "$CAMVID/trainannot/$s.png" "$CVROOT/trainannot/"; done
    for f in $(ls "$CAMVID/val" | head -$CV_N); do s=${f%.*}; cp "$CAMVID/val/$f" "$CVROOT/val/"; cp "$CAMVID/valannot/$s.png" "$CVROOT/valannot/"; done
  fi
  for split in train val; do
    timeout 60 "${SEG[@]}" preprocess "$CVROOT" $split "$WORK/camvid/$split" --dataset camvid --workers 0 --overwrite >/dev/null \
      || echo "CamVid $split: preprocess failed" | tee -a "$OUT/errors.txt"
  done
fi

# A project folder: params.yaml pointing at the shards; outputs under $WORK.
mkdir -p "$WORK/proj"; cp params.yaml "$WORK/proj/params.yaml"
P=(--params "$WORK/proj/params.yaml" -S "data.shards=$WORK/shards" -S "data.outputs=$WORK/out")

log "step: plain fp32 eager vs ours (the loop's step)"
timeout 200 "$PY" benchmarks/train_throughput.py "${BENCH_MODEL[@]}" "${BENCH_DEV[@]}" --crop $CROP \
  --batch $BATCH --steps $STEPS --warmup $WARM --json "$OUT/step.json" | tee "$OUT/step.txt"
log "step: plain fp32 with cudnn.benchmark off (does the autotuner make the 73.9 GiB peak?)"
timeout 60 "$PY" benchmarks/train_throughput.py "${BENCH_MODEL[@]}" "${BENCH_DEV[@]}" --crop $CROP \
  --batch $BATCH --steps $STEPS --warmup $WARM --configs plain --cudnn-benchmark off \
  --json "$OUT/step_nobench.json" | tee "$OUT/step_nobench.txt"

if [ $TOY = 0 ]; then  # CUDA graphs: worth adopting in the loop only if this beats the step above
  log "step: ours with CUDA graphs (torch.compile mode reduce-overhead)"
  timeout 75 "$PY" benchmarks/train_throughput.py "${BENCH_MODEL[@]}" "${BENCH_DEV[@]}" --crop $CROP \
    --batch $BATCH --steps $STEPS --warmup $WARM --configs ours --compile-mode reduce-overhead \
    --json "$OUT/step_cudagraphs.json" | tee "$OUT/step_cudagraphs.txt"
fi

log "loader: our step fed by $WORKERS decode workers, synthetic ${H}x${W} shards"
timeout 90 "$PY" benchmarks/train_throughput.py --mode loader "${BENCH_MODEL[@]}" "${BENCH_DEV[@]}" \
  --crop $CROP --batch $BATCH --steps $STEPS --warmup $WARM --shards "$WORK/shards/train" \
  --workers $WORKERS --json "$OUT/loader_synth.json" | tee "$OUT/loader_synth.txt"

log "seg train: the real loop on synthetic ${H}x${W} shards (compiled as the step above)"
timeout 150 "${SEG[@]}" train "${P[@]}" "${MODEL[@]}" "${DEV[@]}" -S "train.crop_size=[$CH,$CW]" \
  -S train.batch_size=$BATCH -S train.iterations=$ITERS -S train.log_every=$LOGN \
  -S train.val_interval=$ITERS -S train.checkpoint_interval=$ITERS -S train.workers=$WORKERS \
  -S train.warmup_iters=0 -S evaluate.batch_size=$EVAL_BATCH > "$OUT/train_synth.txt" 2>&1 \
  || echo "seg train (synthetic) failed: see train_synth.txt" | tee -a "$OUT/errors.txt"
cp "$WORK/out/train/train_log.jsonl" "$OUT/train_synth_log.jsonl" 2>/dev/null \
  || cp "$WORK/out/train/dvclive/plots/metrics/train/images_per_s.tsv" "$OUT/train_synth_images_per_s.tsv" 2>/dev/null

log "seg eval: full resolution ${H}x${W}, whole and slide, batch $EVAL_BATCH, $WORKERS workers"
for mode in whole slide; do
  timeout 90 "${SEG[@]}" eval "${P[@]}" "${DEV[@]}" -S evaluate.mode=$mode -S evaluate.batch_size=$EVAL_BATCH \
    -S evaluate.workers=$WORKERS --out "$WORK/eval_$mode" > "$OUT/eval_$mode.txt" 2>&1 \
    && cp "$WORK/eval_$mode/metrics.json" "$OUT/eval_$mode.json" \
    || echo "seg eval $mode failed: see eval_$mode.txt" | tee -a "$OUT/errors.txt"
done

if [ -d "$WORK/camvid/train" ]; then
  log "CamVid ${CVH}x${CVW}, batch $CV_BATCH: step fed by the loader vs resident, then seg train (uncompiled both)"
  timeout 90 "$PY" benchmarks/train_throughput.py --mode loader "${BENCH_MODEL[@]}" "${BENCH_DEV[@]}" \
    --no-compile --num-classes 11 --crop $CV_CROP --batch $CV_BATCH --steps $STEPS --warmup $WARM \
    --shards "$WORK/camvid/train" --workers $WORKERS --json "$OUT/loader_camvid.json" | tee "$OUT/loader_camvid.txt"
  timeout 90 "${SEG[@]}" train "${P[@]}" "${MODEL[@]}" "${DEV[@]}" -S data.dataset=camvid -S "data.shards=$WORK/camvid" \
    -S "data.outputs=$WORK/out_camvid" -S "train.crop_size=[$CVH,$CVW]" -S train.batch_size=$CV_BATCH \
    -S train.iterations=$((ITERS + 20)) -S train.log_every=$LOGN -S train.val_interval=100000 \
    -S train.checkpoint_interval=100000 -S train.workers=$WORKERS -S train.compile=false \
    -S train.warmup_iters=0 > "$OUT/train_camvid.txt" 2>&1 \
    || echo "seg train (CamVid) failed: see train_camvid.txt" | tee -a "$OUT/errors.txt"
  cp "$WORK/out_camvid/train/train_log.jsonl" "$OUT/train_camvid_log.jsonl" 2>/dev/null \
    || cp "$WORK/out_camvid/train/dvclive/plots/metrics/train/images_per_s.tsv" "$OUT/train_camvid_images_per_s.tsv" 2>/dev/null
fi

log "seg train --gpus 1: the multi-GPU path (process group, DDP, SyncBN) in one process"
NCCL_DEV=(); [ $TOY = 1 ] && NCCL_DEV=(-S train.device=cpu)
timeout 90 "${SEG[@]}" train --gpus 1 "${P[@]}" "${MODEL[@]}" "${NCCL_DEV[@]}" -S "data.outputs=$WORK/out_nccl" \
  -S "train.crop_size=[$CH,$CW]" -S train.batch_size=$BATCH -S train.iterations=10 -S train.log_every=5 \
  -S train.val_interval=10 -S train.compile=false -S train.workers=$WORKERS -S evaluate.batch_size=$EVAL_BATCH \
  > "$OUT/train_gpus1.txt" 2>&1; echo $? > "$OUT/train_gpus1.rc"

if [ $TOY = 0 ]; then
  log "host syncs per step in the loop (torch.cuda sync debug mode)"
  timeout 120 "$PY" benchmarks/sync_check.py --params "$WORK/proj/params.yaml" -S "data.shards=$WORK/shards" \
    -S train.model.backbone=mobilenet_v3_large -S "train.crop_size=[256,512]" -S train.batch_size=4 \
    -S train.workers=4 -S train.compile=false -S evaluate.batch_size=4 --json "$OUT/sync.json" | tee "$OUT/sync.txt"
fi

log "report"
"$PY" benchmarks/gpu_report.py "$OUT" | tee "$OUT/gpu_check.md"
