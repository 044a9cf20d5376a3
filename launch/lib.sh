# shellcheck shell=bash
# Sourced by the launch scripts, never run: one-line argument errors, the ddpm-bs arguments every
# script takes, and running or (with --dry-run) printing commands.
#
# Written for bash 3.2 as well (macOS, where tpu_pod.sh usually runs): arrays that may be empty
# are expanded as ${a[@]+"${a[@]}"}, which `set -u` accepts there.

PROG=${PROG:-${0##*/}}
DRY_RUN=0
CONFIG=""
WORKDIR=""
TRAIN_ARGS=() # --config.<field>=<value> overrides, then whatever follows `--`, in order.

die() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 2
}

warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# set_value NAME ARG: NAME=VALUE for ARG=--flag=VALUE; dies naming the flag when VALUE is missing.
set_value() {
  case $2 in
    --*=?*) printf -v "$1" '%s' "${2#*=}" ;;
    *) die "${2%%=*} needs a value: ${2%%=*}=VALUE" ;;
  esac
}

# train_arg ARG: takes an argument that goes to ddpm-bs (or --dry-run); dies naming any other.
train_arg() {
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --config | --config=*) set_value CONFIG "$1" ;;
    --workdir | --workdir=*) set_value WORKDIR "$1" ;;
    --config.?*=*) TRAIN_ARGS+=("$1") ;;
    --config.*) die "$1 needs a value: $1=VALUE" ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
}

# require_train_args: dies naming --config or --workdir when either is missing.
require_train_args() {
  [[ -n $CONFIG ]] || die "missing --config=configs/<name>.py"
  [[ -n $WORKDIR ]] || die "missing --workdir=DIR"
}

# ddpm_bs_args: the arguments of the ddpm-bs command line, set in DDPM_BS_ARGS.
# shellcheck disable=SC2034  # the scripts that source this file read it
ddpm_bs_args() {
  DDPM_BS_ARGS=(--config="$CONFIG" --workdir="$WORKDIR" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
}

# shell_line WORD...: the words as one shell command line, each as a shell reads it back: bare
# when that is safe, else in single quotes.
shell_line() {
  local line="" word sq="'" escaped="'\\''"
  for word in "$@"; do
    case $word in
      '') word="''" ;;
      *[!A-Za-z0-9_@%+=:,./-]*) word="'${word//$sq/$escaped}'" ;;
    esac
    line+="${line:+ }$word"
  done
  printf '%s' "$line"
}

# quote WORD: one word, quoted as shell_line does.
quote() { shell_line "$1"; }

# announce LINE: with --dry-run, LINE on stdout; otherwise `+ LINE` on stderr, as a log.
announce() {
  if ((DRY_RUN)); then printf '%s\n' "$1"; else printf '+ %s\n' "$1" >&2; fi
}

# note TEXT: a `# TEXT` comment in the --dry-run output (the output stays a valid shell script).
note() {
  if ((DRY_RUN)); then printf '# %s\n' "$1"; fi
}

# run CMD...: runs CMD, or only prints it with --dry-run.
run() {
  announce "$(shell_line "$@")"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

# run_exec CMD...: replaces this shell with CMD (signals then reach it directly), or prints it.
run_exec() {
  announce "$(shell_line "$@")"
  if ((DRY_RUN)); then exit 0; fi
  exec "$@"
}

# run_line LINE: runs a shell line built with shell_line (for pipelines), or prints it.
run_line() {
  announce "$1"
  if ((DRY_RUN)); then return 0; fi
  eval "$1"
}

# set_env NAME VALUE: exports NAME=VALUE and shows the `export` line.
set_env() {
  export "$1=$2"
  announce "export $1=$(quote "$2")"
}

# gpu_env: the XLA/JAX settings of both GPU launchers; a value already in the environment wins.
gpu_env() {
  # Lets XLA schedule the step's asynchronous collectives (the gradient all-reduce; with
  # mesh.fsdp, the parameter all-gathers and gradient reduce-scatters) to overlap with compute.
  # Flags already in XLA_FLAGS come after it, so they override it.
  set_env XLA_FLAGS "--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
  # JAX preallocates this fraction of each GPU's memory (its default is 0.75); a training run is
  # the GPU's only user, and the 256x256 models want the room.
  set_env XLA_PYTHON_CLIENT_MEM_FRACTION "${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
  # JAX's persistent compilation cache: a relaunch (a resume after preemption) loads the
  # compiled train step instead of compiling it again.
  set_env JAX_COMPILATION_CACHE_DIR \
    "${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm_bs/jax}"
}
