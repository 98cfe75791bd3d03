"""tiermemd config validation: every error names file:key and the reason (parsing only, so
no kernel is needed beyond reading this host's topology for node checks)."""
import pytest

from tiermem.errors import TiermemError
from tiermemd import config, units

GOOD = """
[daemon]
interval = "500ms"
socket = "/tmp/x.sock"
[migration]
bandwidth = "100MiB/s"
batch_pages = 256
[watermarks]
low = "5%"
min = "64MiB"
[[targets]]
name = "a"
pids = [1]
policy = "m5"
sampler = "damon"
[targets.policy_params]
top_k = 1024
[targets.sampler_params]
sample_us = 1000
"""


def load(tmp_path, text):
    p = tmp_path / "t.toml"
    p.write_text(text)
    return config.load(str(p)), str(p)


def test_good_config(tmp_path):
    c, _ = load(tmp_path, GOOD)
    assert c.interval_s == 0.5 and c.bandwidth_bps == 100 * 2**20 and c.batch_pages == 256
    assert c.low == ("share", 0.05) and c.min == ("bytes", 64 * 2**20)
    assert c.targets[0].policy_params == {"top_k": 1024}
    assert c.metrics == ("127.0.0.1", 9473)          # loopback by default


def test_example_config_is_valid():
    import os
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = config.load(os.path.join(here, "daemon", "tiermemd.example.toml"))
    assert c.targets[0].policy == "m5"


@pytest.mark.parametrize("edit, key, reason", [
    (("[daemon]", "[daemon]\nfrobnicate = 1"), "daemon.frobnicate", "unknown key"),
    (('interval = "500ms"', 'interval = "5 fortnights"'), "daemon.interval", "bad duration"),
    (('bandwidth = "100MiB/s"', 'bandwidth = "100MiB"'), "migration.bandwidth", "bad rate"),
    (('low = "5%"', 'low = "500%"'), "watermarks.low", "0%..100%"),
    (('min = "64MiB"', 'min = "64 potatoes"'), "watermarks.min", "bad size"),
    (('policy = "m5"', 'policy = "m6"'), "targets[0].policy", "unknown policy 'm6'"),
    (('sampler = "damon"', 'sampler = "crystal-ball"'), "targets[0].sampler",
     "unknown sampler 'crystal-ball'"),
    (("top_k = 1024", "top_k = -3"), "targets[0].policy_params: parameter 'top_k'", ">= 1"),
    (("top_k = 1024", "topk = 3"), "targets[0].policy_params", "unknown parameter 'topk'"),
    (("sample_us = 1000", "sampel_us = 1"), "targets[0].sampler_params.sampel_us",
     "unknown parameter"),
    (("pids = [1]", "pids = [-1]"), "targets[0].pids", "positive integers"),
    (("pids = [1]", "pids = [1, 4194304]"), "targets[0].pids", "no process with PID 4194304"),
    (("pids = [1]", 'cmdline = "(unclosed"'), "targets[0].cmdline", "bad regular expression"),
    (("pids = [1]", ""), "targets[0]", "no processes selected"),
    (("[daemon]", "[nodes]\nfast = [0]\nslow = [77]\n[daemon]"), "nodes.slow",
     "unknown node 77"),
    (('socket = "/tmp/x.sock"', 'socket = "relative.sock"'), "daemon.socket", "absolute"),
    (('[daemon]', '[deamon]\n[daemon]'), "deamon", "unknown section"),
])
def test_errors_name_file_key_reason(tmp_path, edit, key, reason):
    old, new = edit
    assert old in GOOD
    with pytest.raises(TiermemError) as ei:
        load(tmp_path, GOOD.replace(old, new, 1))
    msg = str(ei.value)
    assert msg.startswith(str(tmp_path / "t.toml") + ":" + key), msg
    assert reason in msg, msg
    assert "\n" not in msg


def test_not_toml_and_missing(tmp_path):
    with pytest.raises(TiermemError, match=r"t.toml: not valid TOML"):
        load(tmp_path, "[daemon\n")
    with pytest.raises(TiermemError, match="no such file"):
        config.load(str(tmp_path / "nope.toml"))
    with pytest.raises(TiermemError, match="targets: no targets"):
        load(tmp_path, "[daemon]\ninterval = '1s'\n")


def test_units():
    assert units.duration("250ms") == 0.25 and units.duration(2) == 2.0
    assert units.size("1GiB") == 2**30 and units.size("4k") == 4096 and units.size(10) == 10
    assert units.rate("1GB/s") == 1e9
    assert units.size_or_share("2%") == ("share", 0.02)
    for bad in ("", "1 s s", "-1s", "0ms"):
        with pytest.raises(ValueError):
            units.duration(bad)


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-inf"])
def test_non_finite_or_huge_durations_are_refused(tmp_path, value):
    """interval = nan / inf / 1e308 passed --check and then killed the daemon (budget
    overflow): refused as file:key: reason."""
    with pytest.raises(TiermemError, match=r"t.toml:daemon.interval: .*duration must be"):
        load(tmp_path, GOOD.replace('interval = "500ms"', f"interval = {value}"))


def test_not_utf8_is_one_line_at_check(tmp_path):
    import subprocess
    import sys
    p = tmp_path / "t.toml"
    p.write_bytes(GOOD.encode().replace(b'name = "a"', b'name = "caf\xe9"'))
    with pytest.raises(TiermemError, match=r"t.toml: not UTF-8 text \(byte \d+\)"):
        config.load(str(p))
    r = subprocess.run([sys.executable, "-m", "tiermemd", "--check", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not UTF-8" in r.stderr, r.stderr


def _number_keys():
    """Every key of the config that takes a number (or a number with a unit), as
    (key path in messages, GOOD text with {v} where the value goes)."""
    from tiermem.policies import POLICIES
    base = GOOD.replace('policy = "m5"\nsampler = "damon"\n[targets.policy_params]\n'
                        'top_k = 1024\n[targets.sampler_params]\nsample_us = 1000\n', "")
    keys = [("daemon.interval", GOOD.replace('interval = "500ms"', "interval = {v}")),
            ("daemon.rescan_every", GOOD.replace("[daemon]", "[daemon]\nrescan_every = {v}")),
            ("migration.bandwidth", GOOD.replace('bandwidth = "100MiB/s"', "bandwidth = {v}")),
            ("migration.batch_pages", GOOD.replace("batch_pages = 256", "batch_pages = {v}")),
            ("watermarks.low", GOOD.replace('low = "5%"', "low = {v}")),
            ("watermarks.min", GOOD.replace('min = "64MiB"', "min = {v}")),
            ("targets[0].pids", GOOD.replace("pids = [1]", "pids = [{v}]"))]
    for name, cls in sorted(POLICIES.items()):
        if cls.needs_future:
            continue
        for k, p in sorted(cls.params.items()):
            if p.type in (int, float):
                keys.append((f"targets[0].policy_params: parameter {k!r}",
                             base + f'policy = "{name}"\n[targets.policy_params]\n{k} = {{v}}\n'))
    import inspect
    for smp, cls in sorted(config.sampler_registry().items()):
        for k, p in sorted(inspect.signature(cls, eval_str=True).parameters.items()):
            if k not in ("force", "attach") and ({int, float} & set(
                    getattr(p.annotation, "__args__", (p.annotation,)))):
                keys.append((f"targets[0].sampler_params.{k}",
                             base + f'sampler = "{smp}"\n[targets.sampler_params]\n{k} = {{v}}\n'))
    return keys


NUMBER_KEYS = _number_keys()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308"])
@pytest.mark.parametrize("key, text", NUMBER_KEYS, ids=[
    k.replace("targets[0].policy_params: parameter ", "policy:" + t.rsplit('policy = "', 1)[-1]
              .split('"')[0] + ".") for k, t in NUMBER_KEYS])
def test_every_number_key_must_be_finite_and_in_range(tmp_path, key, text, value):
    """nan, inf and 1e308 in any numeric key (loop timing, budgets, rates, watermarks,
    policy and sampler parameters) are refused at load as file:key: reason, one line."""
    with pytest.raises(TiermemError) as ei:
        load(tmp_path, text.replace("{v}", value))
    msg = str(ei.value)
    assert msg.startswith(str(tmp_path / "t.toml") + ":" + key), msg
    assert "\n" not in msg


@pytest.mark.parametrize("key, old, new", [
    ("migration.bandwidth", 'bandwidth = "100MiB/s"', 'bandwidth = "' + "9" * 400 + 'B/s"'),
    ("migration.bandwidth", 'bandwidth = "100MiB/s"', 'bandwidth = "2TiB/s"'),
    ("watermarks.min", 'min = "64MiB"', 'min = "' + "9" * 400 + 'MiB"'),
    ("watermarks.min", 'min = "64MiB"', 'min = "1048577GiB"'),
    ("watermarks.low", 'low = "5%"', 'low = "nan%"'),
    ("watermarks.low", 'low = "5%"', 'low = "1e308%"'),
])
def test_huge_sizes_rates_shares_are_refused(tmp_path, key, old, new):
    """A size or rate written with 400 digits overflowed to inf and raised OverflowError
    (a traceback at --check); sizes above 1 PiB and rates above 1 TiB/s are out of range."""
    with pytest.raises(TiermemError) as ei:
        load(tmp_path, GOOD.replace(old, new))
    assert str(ei.value).startswith(str(tmp_path / "t.toml") + ":" + key), ei.value


def test_every_number_key_is_covered():
    """A new numeric policy parameter must declare its upper bound (so 1e308 is refused)."""
    from tiermem.policies import POLICIES
    for name, cls in POLICIES.items():
        for k, p in cls.params.items():
            if p.type in (int, float):
                assert p.max is not None, f"policy {name} parameter {k} has no max"


def test_overflowing_bandwidth_is_one_line_at_check(tmp_path):
    import subprocess
    import sys
    p = tmp_path / "t.toml"
    p.write_text(GOOD.replace('bandwidth = "100MiB/s"', 'bandwidth = "' + "9" * 400 + 'B/s"'))
    r = subprocess.run([sys.executable, "-m", "tiermemd", "--check", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"tiermemd: error: {p}:migration.bandwidth: size must be finite"), r.stderr
