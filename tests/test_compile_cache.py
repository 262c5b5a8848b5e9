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
