"""The compile options the trainers' single-device programs are jitted with (`jaxrl_sparse.xla_options`)."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse import xla_options


class _Mesh:  # what concurrent_kernels reads of a mesh
    def __init__(self, size):
        self.size = size


def test_concurrent_mode_on_one_device_unless_xla_flags_choose(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    want = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
    assert xla_options.concurrent_kernels() == want
    assert xla_options.concurrent_kernels(_Mesh(1)) == want
    assert xla_options.concurrent_kernels(_Mesh(2)) == {}  # multi-device programs keep XLA's default
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_command_buffer_scheduling_mode=LHS")
    assert xla_options.concurrent_kernels() == {}  # the user's mode wins
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert xla_options.concurrent_kernels() == want


def test_the_option_compiles_and_changes_nothing_off_the_gpu():
    """XLA accepts the option (a misspelt mode would fail to compile) and the CPU result is the same."""
    f = lambda x: jnp.tanh(x) @ x.T
    x = jnp.arange(12.0).reshape(3, 4) / 10
    got = jax.jit(f, compiler_options=xla_options.concurrent_kernels())(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(f)(x)))


def test_fused_kernel_walks_tiles_only_beside_concurrent_kernels(monkeypatch):
    """The update's fused weight-gradient + Adam kernel: 256 programs walking the tiles where the
    update's kernels run concurrently, one program per tile where XLA_FLAGS serialises them."""
    from jaxrl_sparse.rl import ppo
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert ppo.default_fused_blocks().programs == 256
    assert ppo.default_fused_blocks(_Mesh(2)).programs == 0
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_command_buffer_scheduling_mode=LHS")
    assert ppo.default_fused_blocks().programs == 0
