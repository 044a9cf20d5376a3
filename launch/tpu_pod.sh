#!/usr/bin/env bash
# Training on a Cloud TPU VM slice, from your machine: creates the slice (or reuses it), copies
# this checkout to every worker, installs it with jax[tpu], runs ddpm-bs on all workers at once
# and streams their output here (and to a log file). Every worker runs the same command; JAX
# reads the slice's topology from the TPU metadata (ddpm-bs sees TPU_WORKER_HOSTNAMES and calls
# jax.distributed.initialize()).
#
#   launch/tpu_pod.sh --name=ddpm-v4 --zone=us-central2-b --accelerator-type=v4-32 [--spot] \
#       --config=configs/cifar10_adm_bs.py --workdir=gs://BUCKET/runs/cifar10_bs [--config.F=V ...]
#   launch/tpu_pod.sh --name=ddpm-v4 --zone=us-central2-b --delete
#
# Resume after preemption: run the same command again. A preempted spot/preemptible slice cannot
# be restarted, so it is deleted and created anew; the run resumes from the newest checkpoint
# under the gs:// workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator-type=TYPE --config=configs/<name>.py
                         --workdir=gs://BUCKET/DIR [options] [--config.<field>=<value> ...]
       launch/tpu_pod.sh --name=NAME --zone=ZONE --delete [--project=PROJECT]

Creates or reuses the TPU VM slice NAME, copies this checkout to all its workers, installs it and
trains on all workers, streaming the output. Needs the gcloud CLI, logged in.

  --name=NAME              the slice's name                                           required
  --zone=ZONE              its zone, e.g. us-central2-b (v4)                          required
  --accelerator-type=TYPE  e.g. v4-32 (4 hosts), v5litepod-16, v5p-32, v6e-16         required
  --config=PATH            config file in this checkout (configs/<name>.py[:arg])     required
  --workdir=gs://B/DIR     checkpoints and logs; a gs:// path outlives the slice      required
  --config.F=V             a config override, passed to ddpm-bs unchanged (repeatable)
  --version=RUNTIME        TPU software version (default: tpu-ubuntu2204-base for v2-v4,
                           v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
                           v2-alpha-tpuv6e for v6e)
  --project=PROJECT        Google Cloud project (default: gcloud's configured one)
  --spot                   create a spot slice (cheaper; can be preempted at any time)
  --preemptible            create a preemptible slice (the older kind of spot)
  --python=VERSION         Python for the workers' virtualenv, made with uv (default 3.12)
  --setup=CMD              a shell command every worker runs before training, e.g. copying
                           the prepared data set to its disk (tfds' array_record files are
                           read from local paths, not gs://)
  --log=FILE               also append the output to FILE (default: runs/tpu-NAME.log)
  --delete                 delete the slice and exit
  --dry-run                print the commands (one per line, shell-quoted) and run nothing
  -h, --help               this help
  -- ARGS                  everything after -- goes to ddpm-bs as is
EOF
}

name="" zone="" accelerator="" version="" project="" python=3.12 log="" capacity="" delete=0
setup=""
while (($#)); do
  case $1 in
    -h | --help) usage && exit 0 ;;
    --name | --name=*) set_value name "$1" ;;
    --zone | --zone=*) set_value zone "$1" ;;
    --accelerator-type | --accelerator-type=*) set_value accelerator "$1" ;;
    --version | --version=*) set_value version "$1" ;;
    --project | --project=*) set_value project "$1" ;;
    --python | --python=*) set_value python "$1" ;;
    --log | --log=*) set_value log "$1" ;;
    --setup | --setup=*) set_value setup "$1" ;;
    --spot | --preemptible)
      [[ -z $capacity || $capacity == "$1" ]] || die "$1 and $capacity exclude each other"
      capacity=$1
      ;;
    --delete) delete=1 ;;
    --) shift && TRAIN_ARGS+=("$@") && break ;;
    *) train_arg "$1" ;;
  esac
  shift
done
[[ -n $name ]] || die "missing --name=NAME (the slice's name)"
[[ -n $zone ]] || die "missing --zone=ZONE"
gcloud_flags=(--zone="$zone")
if [[ -n $project ]]; then gcloud_flags+=(--project="$project"); fi
if ! ((DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI"
fi

if ((delete)); then
  run gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet
  exit 0
fi

[[ -n $accelerator ]] || die "missing --accelerator-type=TYPE (e.g. v4-32)"
require_train_args
[[ -f $root/${CONFIG%%:*} && $CONFIG != /* ]] ||
  die "--config=$CONFIG is not a file in this checkout (give its path from $root)"
if [[ $WORKDIR != gs://* ]]; then
  warn "--workdir=$WORKDIR is on the workers' own disks: use gs://BUCKET/DIR so checkpoints are shared and outlive the slice"
fi
if [[ -z $version ]]; then
  case $accelerator in
    v2-* | v3-* | v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "no default --version for --accelerator-type=$accelerator: give one" ;;
  esac
fi
log=${log:-$root/runs/tpu-$name.log}

# 1. The slice: reuse a READY one of the same type; replace a preempted one; else create it.
tpu=(gcloud compute tpus tpu-vm)
create=("${tpu[@]}" create "$name" "${gcloud_flags[@]}" --accelerator-type="$accelerator"
  --version="$version" ${capacity:+"$capacity"})
describe=("${tpu[@]}" describe "$name" "${gcloud_flags[@]}" --format='value(state,acceleratorType)')
if ((DRY_RUN)); then
  note "create the slice unless describe finds it READY (a PREEMPTED or TERMINATED one is deleted first)"
  run "${describe[@]}"
  run "${create[@]}"
else
  announce "$(shell_line "${describe[@]}")"
  read -r state existing <<<"$("${describe[@]}" 2>/dev/null || true)" || true
  case ${state:-} in
    "") run "${create[@]}" ;;
    PREEMPTED | TERMINATED)
      run "${tpu[@]}" delete "$name" "${gcloud_flags[@]}" --quiet
      run "${create[@]}"
      ;;
    READY)
      existing=${existing##*/} # the type may come as a resource path
      [[ -z $existing || $existing == "$accelerator" ]] ||
        die "slice $name exists as $existing, not $accelerator: choose another --name or --delete it"
      ;;
    *) die "slice $name is $state: wait until it is READY, or --delete it" ;;
  esac
fi

if ! ((DRY_RUN)); then # from here on, whatever happens, the slice stays up
  reminder="$PROG: the slice $name is still up (and billed): $0 --name=$name --zone=$zone${project:+ --project=$project} --delete"
  trap 'echo "$reminder" >&2' EXIT
fi

# 2. This checkout (tracked and untracked files, without what .gitignore ignores) to all workers.
tarball=${TMPDIR:-/tmp}/ddpm_bs-$name.tar.gz
run_line "git -C $(quote "$root") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$root") --null -T - -czf $(quote "$tarball")"
run "${tpu[@]}" scp "$tarball" "$name":ddpm_bs.tar.gz "${gcloud_flags[@]}" --worker=all

# 3. On every worker: stop a run this script started before (by its recorded pid; it checkpoints
# on SIGTERM), unpack the code, and install it with jax[tpu] into a uv virtualenv (the TPU images'
# Python 3.10 is older than JAX needs).
# shellcheck disable=SC2016  # these run on the workers, and expand there
stop_previous='pid=$(cat ~/ddpm_bs.pid 2>/dev/null || true); if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; for _ in $(seq 180); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done; kill -9 "$pid" 2>/dev/null || true; fi'
unpack='rm -rf ~/ddpm_bs && mkdir ~/ddpm_bs && tar -xzf ~/ddpm_bs.tar.gz -C ~/ddpm_bs'
install="python3 -m pip install --user --quiet --upgrade uv && ~/.local/bin/uv venv --quiet --allow-existing --python $(quote "$python") ~/ddpm_bs_venv && ~/.local/bin/uv pip install --quiet --python ~/ddpm_bs_venv/bin/python -e ~/ddpm_bs\"[gcs]\" \"jax[tpu]\""
run "${tpu[@]}" ssh "$name" "${gcloud_flags[@]}" --worker=all --command="set -eu; $stop_previous; $unpack && $install"
if [[ -n $setup ]]; then
  run "${tpu[@]}" ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$setup"
fi

# 4. Train on all workers at once; the output streams here and into the log.
ddpm_bs_args
train="cd ~/ddpm_bs && echo \$\$ > ~/ddpm_bs.pid && exec ~/ddpm_bs_venv/bin/ddpm-bs $(shell_line "${DDPM_BS_ARGS[@]}")"
run mkdir -p "$(dirname "$log")"
run_line "$(shell_line "${tpu[@]}" ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$train") 2>&1 | tee -a $(quote "$log")"
