"""Every preset in configs/ parses with its launcher's flags and gives a valid config."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {"ppo": "PPOConfig", "es": "ESConfig", "grpo": "GRPOConfig"}

SCRIPT = """
import sys
from absl import flags
import launch.{job} as launcher
from launch.common import config_from_flags
from jaxrl_sparse.rl.{job} import {cls}
F = flags.FLAGS
for path in sys.argv[1:]:
    F.unparse_flags()
    F(["x", "--flagfile=" + path])
    cfg = config_from_flags({cls})
    if hasattr(cfg, "validate"):
        cfg = cfg.validate()
    print("OK", path, getattr(cfg, "model", getattr(cfg, "model_name", "")))
"""


def test_every_preset_belongs_to_a_launcher():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.flags")))
    assert files
    for f in files:
        assert os.path.basename(f).split("_")[0] in JOBS, f


@pytest.mark.parametrize("job", sorted(JOBS))
def test_presets_parse(job):
    files = sorted(glob.glob(os.path.join(ROOT, "configs", f"{job}_*.flags")))
    assert files, job
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(job=job, cls=JOBS[job])] + files,
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("OK ") == len(files), r.stdout
