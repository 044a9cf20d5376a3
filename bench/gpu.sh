#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md (issue 8), in groups that each fit one 10-minute command
# (their time limits add up to at most 9.5 minutes, leaving time to install what is missing):
#
#   bench/gpu.sh train     CIFAR-10 ADM step, batch 128: float32, bfloat16, bfloat16 with cuDNN
#                          attention; the bfloat16 step's profile (top 10 ops and op groups)
#   bench/gpu.sh scale     the bfloat16 step at batch 256 and 512, and the 64×64 config (celeba64)
#   bench/gpu.sh sample    DDIM-100 and DPM-Solver++(2M)-20 at batch 1,000 (bfloat16 and float32),
#                          DDIM's profile, Inception features at batch 256
#   bench/gpu.sh flags     the bfloat16 batch-128 step under XLA flags worth trying, one at a time
#                          (compare with the train group's run without them)
#   bench/gpu.sh list      print every group's commands, run nothing
#
# A command may start with one VAR=value (no spaces) that is set for that bench alone.
#
# Every bench prints JSON lines; they go to stdout and are appended to ${OUT:-bench/out}/<group>.jsonl.
# Each bench has its own time limit, so one that hangs or fails costs only its own figures and
# leaves a {"bench": "failed", ...} line. The benches need jax, flax, optax, orbax-checkpoint and
# ml-collections (not clu, ott-jax, TensorFlow or tensorflow-datasets).
set -uo pipefail

cd "$(dirname "$0")/.." || exit
group=${1:-}
cifar=configs/cifar10_adm.py

commands() {
  case $1 in
    train)
      echo "180 bench/train_step.py --config=$cifar --batch=128 --dtype=float32"
      echo "210 bench/train_step.py --config=$cifar --batch=128 --dtype=bfloat16 --profile_dir=/tmp/profile/train_bf16"
      echo "180 bench/train_step.py --config=$cifar --batch=128 --dtype=bfloat16 --config.model.attention_implementation=cudnn"
      ;;
    scale)
      echo "170 bench/train_step.py --config=$cifar --batch=256 --dtype=bfloat16"
      echo "200 bench/train_step.py --config=$cifar --batch=512 --dtype=bfloat16 --steps=10"
      echo "200 bench/train_step.py --config=configs/celeba64.py --batch=128 --dtype=bfloat16 --steps=10"
      ;;
    sample)
      echo "250 bench/sampling.py --config=$cifar --batch=1000 --dtype=bfloat16 --methods=ddim:100,dpm_solver++:20 --profile_dir=/tmp/profile/sample_bf16"
      echo "180 bench/sampling.py --config=$cifar --batch=1000 --dtype=float32 --methods=ddim:100 --repeats=2"
      echo "120 bench/sampling.py --config=$cifar --methods= --inception_batch=256"
      ;;
    flags)
      local step="bench/train_step.py --config=$cifar --batch=128 --dtype=bfloat16"
      echo "180 XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $step"
      echo "180 XLA_FLAGS=--xla_gpu_enable_command_buffer= $step"
      echo "180 XLA_FLAGS=--xla_gpu_autotune_level=0 $step"
      ;;
    *) return 1 ;;
  esac
}

if [[ $group == list ]]; then
  for g in train scale sample flags; do commands "$g" | sed "s/^/$g /"; done
  exit 0
fi
if ! commands "$group" >/dev/null; then
  echo "usage: bench/gpu.sh train|scale|sample|flags|list (got '${group}')" >&2
  exit 2
fi

# Batch 512 wants more than JAX's default 75 % of the GPU; peak_mem_gib is the allocator's peak
# in use either way, not this reservation.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
out=${OUT:-bench/out}
python=${PYTHON:-python3}
mkdir -p "$out"
log="$out/$group.jsonl"
while read -r limit script args; do
  setting=()
  if [[ $script == *=* ]]; then # VAR=value for this bench alone
    setting=("$script")
    read -r script args <<<"$args"
  fi
  cmd="${setting[*]:+${setting[*]} }$python $script $args"
  echo "# $cmd" >&2
  # shellcheck disable=SC2086  # $args is a list of flags
  env "${setting[@]}" timeout -s TERM "$limit" "$python" "$script" $args </dev/null |
    tee -a "$log"
  rc=$?
  if ((rc != 0)); then
    printf '{"bench": "failed", "command": "%s", "rc": %d}\n' "$cmd" "$rc" | tee -a "$log"
  fi
done < <(commands "$group")
