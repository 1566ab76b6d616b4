"""Importing lsrfx changes no global state: Inductor's pass config, logging and the environment are as before, and
the compile pass arrives only with ``adapt``."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, logging, os, sys
import torch
import torch._inductor.config as inductor_config

def snapshot():
    loggers = {name: (lg.level, len(lg.handlers), lg.propagate, lg.disabled)
               for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root = logging.getLogger()
    return {
        "pre_grad_custom_pass": repr(inductor_config.pre_grad_custom_pass),
        "root": [root.level, len(root.handlers)],
        "loggers": loggers,
        "environ": dict(os.environ),
        "recompile_limit": torch._dynamo.config.recompile_limit,
    }

before = snapshot()
import lsrfx
import lsrfx.cli, lsrfx.export, lsrfx.explain, lsrfx.passes
after = snapshot()
# loggers that did not exist before may appear (getLogger creates them); existing ones must be unchanged and new
# ones must carry no level or handler of their own
new = {n: v for n, v in after["loggers"].items() if n not in before["loggers"]}
changed = {n: (before["loggers"][n], v) for n, v in after["loggers"].items()
           if n in before["loggers"] and before["loggers"][n] != v}
model = torch.nn.Sequential(torch.nn.Linear(8, 8))
lsrfx.adapt(model, method="lora", targets=["0"], r=2)
print(json.dumps({
    "same_pass": before["pre_grad_custom_pass"] == after["pre_grad_custom_pass"],
    "pass_before": before["pre_grad_custom_pass"],
    "root_same": before["root"] == after["root"],
    "changed_loggers": changed,
    "configured_new_loggers": {n: v for n, v in new.items() if v[0] != 0 or v[1] != 0},
    "environ_added": sorted(set(after["environ"]) - set(before["environ"])),
    "environ_changed": sorted(k for k in before["environ"] if after["environ"].get(k) != before["environ"][k]),
    "recompile_limit_same": before["recompile_limit"] == after["recompile_limit"],
    "installed_after_adapt": lsrfx.passes.installed(),
}))
"""


def test_import_changes_no_global_config_and_adapt_installs_the_pass():
    env = {"PATH": "/usr/bin:/bin", "LSRFX_LOG": "1", "TRITON_INTERPRET": "1"}  # LSRFX_LOG must not act at import
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pass_before"] == "None"
    assert result["same_pass"], "import lsrfx changed torch._inductor.config.pre_grad_custom_pass"
    assert result["root_same"]
    assert result["changed_loggers"] == {}
    assert result["configured_new_loggers"] == {}
    assert result["environ_added"] == [] and result["environ_changed"] == []
    assert result["recompile_limit_same"]
    assert result["installed_after_adapt"], "adapt must install the compile pass"
