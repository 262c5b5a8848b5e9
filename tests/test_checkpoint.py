"""Orbax checkpoints: round trip (bf16 too), params-only restore, atomicity, corruption."""
import glob
import json
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrl_sparse import checkpoint  # noqa: E402
from jaxrl_sparse.errors import UserError  # noqa: E402


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {"layers": {"attn": {"q_proj": {"kernel": rng.normal(size=(2, 4, 6)).astype(np.float32)}}},
                   "lm_head": {"kernel": jnp.asarray(rng.normal(size=(4, 10)), jnp.bfloat16)}},
        "opt_state": {"mu": jnp.arange(5, dtype=jnp.float32)},
        "step": np.int32(7),
    }


def test_round_trip_metadata_and_params_only(tmp_path):
    d = str(tmp_path / "ckpt")
    t0, t1 = _tree(0), _tree(1)
    assert checkpoint.all_steps(d) == [] and checkpoint.latest_step(d) is None
    checkpoint.save(d, 0, t0, metadata={"trainer": "ppo", "model": {"layers": 2, "dims": (4, 6)}})
    checkpoint.save(d, 20, t1)
    assert checkpoint.all_steps(d) == [0, 20] and checkpoint.latest_step(d) == 20

    # metadata is plain JSON on disk, readable without any trainer code
    assert checkpoint.read_metadata(d, 0) == {"trainer": "ppo", "model": {"layers": 2, "dims": [4, 6]}}
    with open(os.path.join(d, "0", "metadata", "metadata")) as f:
        assert json.load(f)["trainer"] == "ppo"
    assert checkpoint.read_metadata(d, 20) == {}

    full = checkpoint.restore(d)                                   # latest step, numpy leaves
    assert int(full["step"]) == 7
    np.testing.assert_array_equal(full["opt_state"]["mu"], np.arange(5, dtype=np.float32))
    head = full["params"]["lm_head"]["kernel"]
    assert head.dtype == jnp.bfloat16
    np.testing.assert_array_equal(head.astype(np.float32),
                                  np.asarray(t1["params"]["lm_head"]["kernel"], np.float32))

    params = checkpoint.restore_params(d, 0)                       # 'params' only
    assert set(params) == {"layers", "lm_head"}
    np.testing.assert_array_equal(params["layers"]["attn"]["q_proj"]["kernel"],
                                  t0["params"]["layers"]["attn"]["q_proj"]["kernel"])

    one = checkpoint.restore_params(d, 0, paths=["lm_head/kernel"])  # a single leaf
    assert list(one) == ["lm_head"]

    # sharded restore target: abstract arrays with shardings -> jax arrays placed there
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          t0["params"])
    got = checkpoint.restore_params(d, 0, target)
    assert isinstance(got["lm_head"]["kernel"], jax.Array)
    assert got["lm_head"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["layers"]["attn"]["q_proj"]["kernel"]),
                                  t0["params"]["layers"]["attn"]["q_proj"]["kernel"])


def test_resume_item_kept_only_in_the_newest_steps(tmp_path):
    """The optimizer state (`resume=`) lives in its own item; older steps lose it, keep their weights."""
    d = str(tmp_path / "ckpt")
    for step in range(4):
        checkpoint.save(d, step, {"params": {"w": np.full(3, step, np.float32)}},
                        resume={"mu": np.full(3, 10 + step, np.float32)}, keep_resume=2)
    assert checkpoint.all_steps(d) == [0, 1, 2, 3]
    assert [checkpoint.has_resume(d, s) for s in range(4)] == [False, False, True, True]
    target = {"mu": jnp.zeros(3, jnp.float32)}
    np.testing.assert_array_equal(np.asarray(checkpoint.restore_resume(d, 2, target)["mu"]), [12, 12, 12])
    with pytest.raises(UserError, match="holds no optimizer state"):
        checkpoint.restore_resume(d, 1, target)
    with pytest.raises(UserError, match=r"holds optimizer state \['mu'\], the run needs \['mu', 'nu'\]"):
        checkpoint.restore_resume(d, 3, {**target, "nu": jnp.zeros(3)})   # not fresh moments, silently
    np.testing.assert_array_equal(checkpoint.restore_params(d, 0)["w"], [0, 0, 0])   # weights stay
    assert set(checkpoint.tree_metadata(d, 3)) == {"params"}   # the state item holds no moments
    # 0 keeps every one; overwriting the newest step does not strip it
    e = str(tmp_path / "all")
    for step in range(3):
        checkpoint.save(e, step, {"params": {"w": np.zeros(2)}}, resume={"mu": np.zeros(2)}, keep_resume=0)
    checkpoint.save(e, 2, {"params": {"w": np.ones(2)}}, resume={"mu": np.ones(2)}, overwrite=True, keep_resume=0)
    assert [checkpoint.has_resume(e, s) for s in range(3)] == [True, True, True]
    with pytest.raises(UserError, match="--keep_opt_state must be >= 0"):
        checkpoint.check_keep_resume(-1, "--keep_opt_state")


def test_check_disk_warns_before_a_run_that_would_not_fit(tmp_path, monkeypatch, capsys):
    """n checkpoints of the weights, the optimizer state in the newest `keep` only, plus an export."""
    import collections
    weights, moments = {"w": np.zeros((256, 256), np.float32)}, {"mu": np.zeros((2, 256, 256), np.float32)}
    w, m = 256 * 256 * 4, 2 * 256 * 256 * 4
    assert checkpoint.tree_nbytes(weights) == w and checkpoint.tree_nbytes(jax.eval_shape(lambda: moments)) == m
    usage = collections.namedtuple("usage", "total used free")
    need = 10 * w + 2 * m + w                         # 10 steps, moments kept in 2, an export
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, need))
    d = str(tmp_path / "not" / "yet" / "made")        # checked on the nearest existing folder
    assert checkpoint.check_disk(d, 10, weights, moments, 2, w) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, need - 1))
    msg = checkpoint.check_disk(d, 10, weights, moments, 2, w)
    assert msg.startswith("warning: the run's 10 checkpoints need about") and "--keep_opt_state" in msg
    assert msg in capsys.readouterr().err and "\n" not in msg
    assert checkpoint.check_disk(d, 10, weights, moments, 0, w) is not None   # 0 = moments in all 10
    assert checkpoint.check_disk(d, 0, weights, moments, 2, w) is None         # nothing left to write


def test_existing_step_and_overwrite(tmp_path):
    d = str(tmp_path / "ckpt")
    checkpoint.save(d, 5, _tree(0))
    with pytest.raises(UserError, match="already exists"):
        checkpoint.save(d, 5, _tree(1))
    checkpoint.save(d, 5, _tree(1), overwrite=True)
    np.testing.assert_array_equal(checkpoint.restore(d, 5)["opt_state"]["mu"], np.arange(5))
    np.testing.assert_array_equal(
        checkpoint.restore_params(d, 5)["layers"]["attn"]["q_proj"]["kernel"],
        _tree(1)["params"]["layers"]["attn"]["q_proj"]["kernel"])


def test_half_written_step_is_not_listed(tmp_path):
    d = str(tmp_path / "ckpt")
    checkpoint.save(d, 10, _tree(0))
    # what Orbax leaves behind when a writer dies mid-save: a tmp folder with partial content
    shutil.copytree(os.path.join(d, "10"), os.path.join(d, "20.orbax-checkpoint-tmp-1700000000"))
    assert checkpoint.all_steps(d) == [10]
    assert checkpoint.latest_step(d) == 10
    with pytest.raises(UserError, match="not in"):
        checkpoint.restore(d, 20)


@pytest.mark.parametrize("damage", ["data", "manifest", "item"])
def test_corrupt_checkpoint_is_a_user_error(tmp_path, damage):
    d = str(tmp_path / "ckpt")
    checkpoint.save(d, 3, _tree(0))
    state = os.path.join(d, "3", "state")
    if damage == "data":            # array chunks gone
        for p in glob.glob(os.path.join(state, "**", "d"), recursive=True):
            shutil.rmtree(p)
    elif damage == "manifest":      # truncated index
        for p in glob.glob(os.path.join(state, "**", "manifest.ocdbt"), recursive=True):
            with open(p, "wb") as f:
                f.write(b"xx")
    else:                           # the whole tree item missing
        shutil.rmtree(state)
    with pytest.raises(UserError, match="step 3 .* cannot be read"):
        checkpoint.restore_params(d, 3)


def test_missing_dir_and_step(tmp_path):
    with pytest.raises(UserError, match="no checkpoints"):
        checkpoint.restore(str(tmp_path / "nothing"))
    d = str(tmp_path / "ckpt")
    checkpoint.save(d, 1, _tree(0))
    with pytest.raises(UserError, match="available steps: 1"):
        checkpoint.restore(d, 2)
    with pytest.raises(UserError, match="has no 'params/nope'"):
        checkpoint.restore_params(d, 1, paths=["nope"])
