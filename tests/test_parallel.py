"""One Mesh for every trainer: mesh parsing, FSDP shardings, and the trainers on 4 fake CPU devices
with data:2,fsdp:2 (GRPO in one process; PPO and ES as 2 OS processes x 2 devices joined by
`jax.distributed` with gloo CPU collectives) equal one device.

Tolerance: metrics agree to rel 1e-5 (abs 1e-6). Sharded reductions (fsdp-split matmuls, the
batch split over 4 devices) sum in another order, so floats differ in the last bits (measured:
<= 3e-6 relative, in PPO's effective ranks); sampled tokens, rewards and ES reward_history.csv
rows are identical.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from jaxrl_sparse import parallel
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import preset
from jaxrl_sparse.models.decoder import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "parallel_worker.py")
RTOL, ATOL = 1e-5, 1e-6


def test_parse_mesh():
    assert parallel.parse_mesh("", 4) == {"data": 4, "fsdp": 1}
    assert parallel.parse_mesh("data:2,fsdp:2", 4) == {"data": 2, "fsdp": 2}
    assert parallel.parse_mesh("fsdp:8", 8) == {"data": 1, "fsdp": 8}
    assert parallel.parse_mesh("data:-1,fsdp:2", 8) == {"data": 4, "fsdp": 2}
    assert parallel.parse_mesh(" fsdp : 2 , data ", 4) == {"data": 2, "fsdp": 2}
    for bad, why in (("model:2", "unknown axis"), ("data:0", "positive"), ("data:2,fsdp:2", "needs 4"),
                     ("data:-1,fsdp:-1", "only one"), ("data:x", "integer"), ("data:1,data:2", "twice"),
                     ("fsdp:3,data:-1", "not divisible")):
        with pytest.raises(UserError, match=why):
            parallel.parse_mesh(bad, 2 if bad == "data:2,fsdp:2" else 4)


def test_param_shardings_follow_the_rules():
    """qwen2.5-7b shapes (no allocation): big arrays split on fsdp along their largest divisible
    non-layer dim; small ones replicated; the Adam state like the parameters."""
    import optax
    cfg = preset("qwen2.5-7b")
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    P = jax.sharding.PartitionSpec
    spec = lambda path, shape: parallel.param_spec(shape, 4, stacked=path.startswith("layers"))
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert flat["layers/mlp/gate_proj/kernel"] == (28, 3584, 18944)
    assert spec("layers/mlp/gate_proj/kernel", (28, 3584, 18944)) == P(None, None, "fsdp")
    assert spec("layers/mlp/down_proj/kernel", (28, 18944, 3584)) == P(None, "fsdp")
    assert spec("layers/attn/k_proj/kernel", (28, 3584, 512)) == P(None, "fsdp")
    assert spec("embed/embedding", (152064, 3584)) == P("fsdp")
    assert spec("layers/input_norm/scale", (28, 3584)) == P(None, "fsdp")   # 100k entries: split
    assert spec("final_norm/scale", (3584,)) == P()                         # < 2**14: replicated
    assert spec("layers/x", (28, 3, 5)) == P()                              # small
    assert spec("layers/x", (4, 1025, 33)) == P("fsdp")                     # only the layer axis divides
    assert parallel.param_spec((1 << 20,), 1) == P()                        # fsdp = 1: replicated
    mesh = parallel.make_mesh("")
    sh = parallel.param_shardings(shapes, mesh)
    assert all(s.spec == P() for s in jax.tree_util.tree_leaves(sh))       # one device: replicated
    opt_shapes = jax.eval_shape(optax.adam(1e-3).init, shapes)
    assert len(jax.tree_util.tree_leaves(parallel.param_shardings(opt_shapes, mesh))) == \
        2 * len(jax.tree_util.tree_leaves(shapes)) + 1
    lay = parallel.param_layout(shapes, mesh)
    assert hash(lay) == hash(parallel.param_layout(shapes, mesh))          # usable as a jit-cache key
    with pytest.raises(UserError, match="not divisible"):
        parallel.check_batch(3, _FakeMesh(), "batch")


class _FakeMesh:
    shape = {"data": 2, "fsdp": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(n_devices: int):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    if n_devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    return env


def _start(args, n_devices: int):
    return subprocess.Popen([sys.executable, WORKER] + args, cwd=ROOT, env=_env(n_devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "RESULT " in out, out[-2000:] + err[-4000:]
    return json.loads(out.split("RESULT ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def runs(tiny_lm_dir, tmp_path_factory):
    """Every worker at once (they share the CPU): one device (the reference); GRPO on 4 fake devices
    in one process with data:2,fsdp:2; PPO and ES as two processes x 2 fake devices joined by
    jax.distributed, on the same data:2,fsdp:2 mesh (fsdp inside a process, data across them: the
    usual multi-host layout). CPU time is the budget of these tests, so PPO/ES 4-device runs are
    the 2-process ones."""
    tmp = tmp_path_factory.mktemp("parallel")
    common = [f"--model_dir={tiny_lm_dir}"]
    port = _free_port()
    procs = {
        "one": _start(common + ["--jobs=ppo,es,grpo", f"--workdir={tmp / 'one'}"], 1),
        "four": _start(common + ["--jobs=grpo", "--mesh=data:2,fsdp:2", f"--workdir={tmp / 'four'}"], 4),
    }
    for i in range(2):
        procs[f"proc{i}"] = _start(common + ["--jobs=ppo,es", "--mesh=data:2,fsdp:2", f"--workdir={tmp / 'mp'}",
                                             f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                             f"--process_id={i}"], 2)
    try:
        return {k: _result(p) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def _close(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and a == pytest.approx(b, rel=RTOL, abs=ATOL), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
def test_grpo_four_devices_data2_fsdp2_matches_one_device(runs):
    one, four = runs["one"], runs["four"]
    assert (one["devices"], four["devices"]) == (1, 4)
    _close(one["grpo"], four["grpo"], "grpo")
    assert one["grpo"][-1]["objective/loss"] is not None and one["grpo"][-1]["reward/std"] >= 0


@pytest.mark.slow
def test_two_processes_data2_fsdp2_match_one_process(runs):
    """One PPO update and one ES iteration, 2 OS processes x 2 CPU devices (data:2,fsdp:2): the same
    metrics, ES weights and reward_history.csv as one process on one device."""
    one, p0, p1 = runs["one"], runs["proc0"], runs["proc1"]
    assert (p0["processes"], p0["devices"], p1["process"]) == (2, 4, 1)
    assert len(p0["ppo"][0]) > 20 and "rank/global/density" in p0["ppo"][0]
    assert one["ppo"][0]["ppo/minibatches_applied"] > 0
    # ES: the proxy reward varies, so the update moved the weights
    assert len({r.split(",")[-1] for r in one["es"]["reward_history_csv"].splitlines()[1:]}) > 1
    _close(one["ppo"], p0["ppo"], "ppo")
    _close(one["es"]["history"], p0["es"]["history"], "es")
    _close(one["es"]["param_sums"], p0["es"]["param_sums"], "es params")
    _close(p0["es"]["history"], p1["es"]["history"], "es process 1")      # every process agrees
    _close(p0["es"]["param_sums"], p1["es"]["param_sums"], "es params process 1")
    assert p0["es"]["reward_history_csv"] == one["es"]["reward_history_csv"]
    assert p1["es"]["reward_history_csv"] == ""                           # only process 0 writes
