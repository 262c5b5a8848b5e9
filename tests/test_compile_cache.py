"""The opt-in persistent compilation cache (`jaxrl_sparse.compile_cache`, `--compilation_cache`)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse import compile_cache


def test_resolve_dir_is_off_unless_named(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.resolve_dir() is None
    for off in ("", "off", "0", "None"):
        assert compile_cache.resolve_dir(off) is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve_dir() == str(tmp_path / "env")
    assert compile_cache.resolve_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")   # the flag wins
    assert compile_cache.resolve_dir("off") is None


def test_unwritable_directory_warns_and_leaves_the_cache_off(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert compile_cache.enable(str(blocker / "cache")) is None
    assert "compilation cache off" in capsys.readouterr().err


@pytest.fixture
def restore_cache_config():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_compilation_cache_max_size")
    old = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    from jax._src import compilation_cache as cc
    cc.reset_cache()


def test_a_recompiled_program_is_loaded_from_the_cache(tmp_path, restore_cache_config):
    from jax._src import compilation_cache as cc
    cc.reset_cache()
    d = compile_cache.enable(str(tmp_path / "xla"), min_compile_secs=0.0)
    assert d == str(tmp_path / "xla")
    hits = []
    listener = lambda name, **kw: hits.append(name)  # noqa: E731
    jax.monitoring.register_event_listener(listener)

    def build():   # a fresh closure: jit's in-memory cache misses, the persistent one must hit
        return jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) * 3.0)

    x = jnp.arange(12.0).reshape(3, 4)
    a = build()(x)
    assert os.listdir(d), "nothing was written to the cache"
    n = hits.count("/jax/compilation_cache/cache_hits")
    b = build()(x)
    from jax._src import monitoring
    monitoring.unregister_event_listener(listener)
    assert hits.count("/jax/compilation_cache/cache_hits") == n + 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_PRINT_FLAGS = ("import os, sys; sys.argv[0] = 'x'; from launch.common import run_main; "
                "run_main(lambda argv: print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', '')))")


@pytest.mark.parametrize("det", [False, True])
def test_deterministic_flag_sets_xla_deterministic_ops(det):
    import subprocess
    import sys
    from launch.common import DETERMINISTIC_XLA_FLAG
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", _PRINT_FLAGS] + (["--deterministic"] if det else []),
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("XLA_FLAGS=")][0]
    assert (DETERMINISTIC_XLA_FLAG in line.split("=", 1)[1].split()) == det


def test_deterministic_after_the_backend_started_is_a_clear_error():
    from jaxrl_sparse.errors import UserError
    from launch.common import use_deterministic_ops
    jax.devices()
    with pytest.raises(UserError, match="XLA_FLAGS=--xla_gpu_deterministic_ops=true"):
        use_deterministic_ops()
