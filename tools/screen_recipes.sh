#!/usr/bin/env bash
# Screen candidate recipes at equal wall-clock time (validation time not counted) by their validation
# KID curves; results land in runs/screen/<name>/metrics.jsonl. Usage:
#   tools/screen_recipes.sh PHOTOS_DIR PAINTINGS_DIR MINUTES [NAME ...]
set -euo pipefail
photos=$1 paintings=$2 minutes=$3
shift 3
common=(--photos "$photos" --paintings "$paintings" --preset cpu --decay none --steps 1000000
        --checkpoint-every 1000000 --no-export --max-minutes "$minutes")
tools=(--diffaugment color,translation,cutout --ema 0.999)
declare -A recipes=(
  [fastcut_da_ema]="--model fastcut ${tools[*]} --eval-every 400"
  [cyclegan_da_ema]="--model cyclegan ${tools[*]} --eval-every 120"
  [cut_da_ema]="--model cut ${tools[*]} --eval-every 250"
  [fastcut_plain]="--model fastcut --eval-every 400"
  [fastcut_da_ema_big]="--model fastcut ${tools[*]} --ngf 64 --n-blocks 9 --eval-every 150"
  [cyclegan_plain]="--model cyclegan --eval-every 120"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(fastcut_da_ema cyclegan_da_ema cut_da_ema fastcut_plain fastcut_da_ema_big)
for name in "${names[@]}"; do
  out=runs/screen/$name
  # shellcheck disable=SC2086
  python -m training.fit "${common[@]}" --out "$out" ${recipes[$name]} > "runs/screen/$name.log" 2>&1 || true
done
