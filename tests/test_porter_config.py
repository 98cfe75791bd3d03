"""Porter config validation (file:key: reason), the CLI's one-line errors, and the clone-policy
switch rule. No root needed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cxlfork.porter import config, policy


def _write(tmp_path, text):
    p = tmp_path / "porter.toml"
    p.write_text(text)
    return str(p)


def test_good_config_defaults(tmp_path):
    f = _write(tmp_path, '[functions.llm]\ncommand = ["python", "-m", "cxlfork.workers.llm"]\n')
    c = config.load(f)
    assert c.host == "127.0.0.1" and c.checkpoint_after == 16
    fc = c.functions["llm"]
    assert fc.command[0] == sys.executable and fc.policy == "auto"
    assert fc.checkpoint_after == 16 and fc.max_instances == 4 and fc.protocol == "stdio"


@pytest.mark.parametrize("text, where, why", [
    ("[porter]\nprot = 1\n", ":porter.prot:", "unknown key"),
    ("[porter]\nport = \"x\"\n", ":porter.port:", "must be an integer"),
    ("[porter]\nport = 70000\n", ":porter.port:", "<= 65535"),
    ("[porter]\nghost_pool = -1\n", ":porter.ghost_pool:", "must be >= 0"),
    ("[functions.f]\ncommand = []\n", ":functions.f.command:", "non-empty list"),
    ("[functions.f]\ncommand = [\"true\"]\npolicy = \"fast\"\n", ":functions.f.policy:",
     "must be one of"),
    ("[functions.f]\ncommand = [\"true\"]\nmax_instances = 0\n", ":functions.f.max_instances:",
     ">= 1"),
    ("[functions.f]\ncommand = [\"/nonexistent/w\"]\n", ":functions.f.command:",
     "not an executable"),
    ("[functions.\"a b\"]\ncommand = [\"true\"]\n", ":functions.a b:", "function name"),
    ("[porter\n", ": not valid TOML", ""),
    ("[functions.f]\ncommand = [\"true\"]\nprotocol = \"grpc\"\n", ":functions.f.protocol:",
     "must be one of stdio, openwhisk, http, got 'grpc'"),
    ("[functions.f]\ncommand = [\"true\"]\nprotocol = \"http\"\ninit = {a = 1}\n",
     ":functions.f.init:", 'protocol "http" has no init request'),
])
def test_bad_config_names_file_key_reason(tmp_path, text, where, why):
    f = _write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(f)
    msg = str(e.value)
    assert msg.startswith(f) and where in msg and why in msg, msg


def test_cli_bad_config_is_one_line(tmp_path):
    f = _write(tmp_path, "[functions.f]\ncommand = [\"true\"]\npolicy = 3\n")
    r = subprocess.run([sys.executable, "-m", "cxlfork", "porter", "--config", f],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"cxlfork: error: {f}:functions.f.policy:")


def test_cli_missing_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cxlfork", "porter", "--config",
                        str(tmp_path / "nope.toml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_policy_switch_rule():
    # latency over the SLO without pressure: toward copying (faster access)
    assert policy.next_policy("mow", 50.0, 10.0, 0.0)[0] == "hybrid"
    assert policy.next_policy("hybrid", 50.0, 10.0, 0.0)[0] == "moa"
    assert policy.next_policy("moa", 50.0, 10.0, 0.0) is None
    # pressure wins over the SLO: toward sharing
    assert policy.next_policy("moa", 50.0, 10.0, 0.95)[0] == "hybrid"
    assert policy.next_policy("mow", 50.0, 10.0, 0.95) is None
    # over the SLO but pressure in the middle band: hold
    assert policy.next_policy("mow", 50.0, 10.0, 0.75) is None
    # far under the SLO with some pressure: give memory back
    assert policy.next_policy("moa", 1.0, 10.0, 0.6)[0] == "hybrid"
    assert policy.next_policy("hybrid", None, 10.0, 0.0) is None
