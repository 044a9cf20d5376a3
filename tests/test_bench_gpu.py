"""`bench/gpu.sh`, the device's one command per group: every command it would run names a bench
that exists, flags that bench defines, and config fields that exist (a renamed flag would
otherwise surface only on a lent GPU, as a lost group)."""

import importlib
import pathlib
import re
import subprocess

import pytest
from support import ROOT


def _commands():
    listed = subprocess.run(
        ["bash", "bench/gpu.sh", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [line.split() for line in listed.splitlines()]


def test_the_suite_has_every_issue_figure():
    groups = {}
    for group, limit, *command in _commands():
        script, *flags = _without_setting(command)
        groups.setdefault(group, []).append((int(limit), script, flags))
    assert set(groups) == {"train", "scale", "sample", "flags"}
    for runs in groups.values():  # one device command each: 10 minutes, less 30 s to install
        assert sum(limit for limit, _, _ in runs) <= 570
    flags = {f for runs in groups.values() for _, _, fs in runs for f in fs}
    assert {"--batch=128", "--batch=256", "--batch=512", "--batch=1000"} <= flags
    assert {"--dtype=float32", "--dtype=bfloat16", "--inception_batch=256"} <= flags
    assert any(f.startswith("--profile_dir=") for f in flags)


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c[2:])[:90])
def test_each_command_uses_flags_its_bench_defines(command):
    script, *flags = _without_setting(command[2:])
    source = (ROOT / script).read_text()
    defined = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))
    config_file = None
    for flag in flags:
        name, _, value = flag[2:].partition("=")
        if name.startswith("config."):
            assert config_file, f"{flag} comes before --config"
            node = _load(config_file)
            *path, field = name.split(".")[1:]
            for part in path:
                node = node[part]
            assert field in node, f"{script}: {flag}: the config has no field {name[7:]!r}"
            continue
        assert name in defined, f"{script} defines no flag --{name}"
        if name == "config":
            config_file = value
            assert (ROOT / value).is_file()


def _without_setting(command):
    """The command less a leading VAR=value, which must set an upper-case variable."""
    if "=" in command[0]:
        assert re.fullmatch(r"[A-Z_]+=\S*", command[0]), command[0]
        return command[1:]
    return command


def _load(config_file):  # configs/x.py, as the suite loads configs
    return importlib.import_module(f"configs.{pathlib.Path(config_file).stem}").get_config()
