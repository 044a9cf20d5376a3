#!/usr/bin/env bash
# One host, all its GPUs, one process: a single ddpm-bs drives every visible GPU (the mesh's
# data axis spans them), with the XLA settings below.
#
#   launch/local.sh --config=configs/cifar10_adm_bs.py --workdir=runs/cifar10_bs \
#       [--gpus=0,1,2,3] [--config.<field>=<value> ...] [--dry-run] [-- DDPM_BS_FLAGS...]
#
# Run it again with the same --workdir to resume from the newest checkpoint.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/local.sh --config=configs/<name>.py --workdir=DIR [options] [--config.<field>=<value> ...]

Trains on this host's GPUs in one process (JAX sees every local GPU).

  --config=PATH       config file, as ddpm-bs takes it (configs/<name>.py[:arg])     required
  --workdir=DIR       checkpoints, logs and samples; the same DIR resumes              required
  --config.F=V        a config override, passed to ddpm-bs unchanged (repeatable)
  --gpus=LIST         GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --dry-run           print the commands (one per line, shell-quoted) and run nothing
  -h, --help          this help
  -- ARGS             everything after -- goes to ddpm-bs as is (e.g. -- --mode=sample)

Environment it sets (values already set in yours win; see launch/lib.sh):
  XLA_FLAGS                        --xla_gpu_enable_latency_hiding_scheduler=true, then yours
  XLA_PYTHON_CLIENT_MEM_FRACTION   0.90 of each GPU preallocated (JAX's default is 0.75)
  JAX_COMPILATION_CACHE_DIR        ~/.cache/ddpm_bs/jax, so a relaunch skips the compile
EOF
}

gpus=""
while (($#)); do
  case $1 in
    -h | --help) usage && exit 0 ;;
    --gpus | --gpus=*) set_value gpus "$1" ;;
    --) shift && TRAIN_ARGS+=("$@") && break ;;
    *) train_arg "$1" ;;
  esac
  shift
done
require_train_args
[[ $gpus =~ ^[0-9]+(,[0-9]+)*$ || -z $gpus ]] || die "--gpus takes GPU indices like 0,1,2,3, not '$gpus'"

if ! ((DRY_RUN)); then
  command -v ddpm-bs >/dev/null || die "ddpm-bs is not on PATH: pip install -e . (see README.md)"
fi

# One process: variables of a surrounding Slurm/MPI job would make ddpm-bs call
# jax.distributed.initialize() and wait for peers that never start.
run unset SLURM_NTASKS OMPI_COMM_WORLD_SIZE JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES
if [[ -n $gpus ]]; then
  set_env CUDA_VISIBLE_DEVICES "$gpus"
fi
gpu_env
ddpm_bs_args
run_exec ddpm-bs "${DDPM_BS_ARGS[@]}"
