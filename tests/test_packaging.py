"""The installed package: passes/ and models/ live at the top of the repository but install as
fxpar.passes and fxpar.models, so that a user's own ``models`` package is never taken over."""

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setup = tomllib.load(f)["tool"]["setuptools"]
    found = {"fxpar." + os.path.relpath(d, os.path.join(ROOT, "fxpar")).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "fxpar")) if "__init__.py" in files and "__pycache__" not in d}
    found = {"fxpar" if p == "fxpar.." else p for p in found} | {"fxpar.passes", "fxpar.models"}
    assert set(setup["packages"]) == found
    assert setup["package-dir"] == {"fxpar.passes": "passes", "fxpar.models": "models"}


def test_no_top_level_models_or_passes_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u, fxpar.models.gpt, fxpar.passes.plan_sharding; "
            "print(u.find_spec('models'), u.find_spec('passes'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]
