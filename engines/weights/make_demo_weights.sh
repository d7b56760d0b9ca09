#!/usr/bin/env bash
# Regenerates the shipped demo weights (engines/weights/*.pt) from simulated data; see MODEL_CARD.md.
# Usage: engines/weights/make_demo_weights.sh WORKDIR   (run from the repository root; single-threaded CPU is enough)
set -euo pipefail
W=${1:?work folder}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$W"
# VSI-SR: meta-train on simulated beads + puncta (2 photon levels each), fine-tune on simulated filaments.
$PY -m streamer prepare-data "$W/vsisr-data" --simulator --structures beads,puncta --photon-levels 100,400 \
    --finetune-structure filaments --cells 3 --planes 12 --size 64 --patch 32 --patches-per-task 300 \
    --finetune-patches 300 --val-crop 64 --seed 0
$PY -m streamer train-meta "$W/vsisr-data" --out "$W/vsisr-meta" --steps 150 --features 32 --groups 2 --blocks 2 \
    --head-features 64 --disc-base 4 --task-iters 1 --g-steps 3 --g-lr-outer 5e-4 --save-every 25 --device cpu \
    --no-progress
$PY -m streamer finetune "$W/vsisr-data" --meta-model "$W/vsisr-meta/meta_model_rllsm.pth" --out "$W/vsisr-ft" \
    --device cpu --no-progress
# RL-DFN: self-supervised on dual-view volumes from the built-in dual-view generator (filaments), behind the
# reference's RL step (what the trainer did when these weights were made).
$PY -m streamer train-fusion --synthetic --structure filaments --volumes 2 --size 32,96,96 --patch 24,48,48 \
    --width 8 --disc-width 8 --lr 1e-3 --steps 800 --save-every 25 --rl-step reference --out "$W/rldfn" --device cpu \
    --no-progress
$PY -m engines.weights.pack "$W/vsisr-ft/finetuned.pth" "$W/rldfn/rldfn.pt"
