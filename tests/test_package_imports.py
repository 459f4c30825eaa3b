"""The packages import their modules on first use (`python -m lamelm_fast.train` turns a Ctrl-C during torch's import
into one line), yet show their names to dir() and reach their submodules as attributes, as eager imports did."""

from __future__ import annotations

import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import lamelm_fast
import lamelm_fast.train

FRESH_INTERPRETER = """
import json, sys
import lamelm_fast, lamelm_fast.train

seen = {"torch_on_import": "torch" in sys.modules, "dir": dir(lamelm_fast), "train_dir": dir(lamelm_fast.train)}
seen["torch_after_dir"] = "torch" in sys.modules
seen["attributes"] = [repr(lamelm_fast.ops.fused_linear_cross_entropy), lamelm_fast.train.checkpoint.__name__,
                      lamelm_fast.metrics.logger.__name__, lamelm_fast.kernels.__name__,
                      repr(lamelm_fast.apply_kernels), repr(lamelm_fast.train.TrainConfig)]
try:
    lamelm_fast.no_such_module
except AttributeError as error:
    seen["missing"] = str(error)
print(json.dumps(seen))
"""


def test_import_stays_light_and_dir_and_submodule_attributes_work_in_a_fresh_interpreter(tmp_path: Path) -> None:
    # -P and another working directory: the repo's kernels/ folder must not shadow the `kernels` package.
    result = subprocess.run([sys.executable, "-P", "-c", FRESH_INTERPRETER], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert not seen["torch_on_import"] and not seen["torch_after_dir"]
    assert {"apply_kernels", "ops", "optim", "train", "metrics", "integrations", "patching", "explain", "export",
            "kernels", "__version__"} <= set(seen["dir"])
    assert {"TrainConfig", "train", "TrainResult", "TrainingStopped", "ConfigError", "checkpoint", "loop", "config",
            "data"} <= set(seen["train_dir"])
    assert "__main__" not in seen["train_dir"]  # importing it would train
    assert seen["attributes"][1:4] == ["lamelm_fast.train.checkpoint", "lamelm_fast.metrics.logger",
                                       "lamelm_fast.kernels"]
    assert "fused_linear_cross_entropy" in seen["attributes"][0] and "apply_kernels" in seen["attributes"][4]
    assert "TrainConfig" in seen["attributes"][5]
    assert seen["missing"] == "module 'lamelm_fast' has no attribute 'no_such_module'"


def test_the_lazy_lists_name_every_module_of_the_packages() -> None:
    found = {module.name for module in pkgutil.iter_modules(lamelm_fast.__path__)}
    # kernels/ is a top-level folder of the repo, installed as lamelm_fast.kernels by pyproject's package-dir.
    assert importlib.util.find_spec("lamelm_fast.kernels") is not None
    assert set(lamelm_fast._SUBMODULES) == found | {"kernels"}
    train_modules = {module.name for module in pkgutil.iter_modules(lamelm_fast.train.__path__)} - {"__main__"}
    assert set(lamelm_fast.train._SUBMODULES) == train_modules
