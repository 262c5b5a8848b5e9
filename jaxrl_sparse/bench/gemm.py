"""`python -m launch.bench gemm`: the PPO update's matrix products alone, and two rewrites of them.

Shapes of one mini-batch step of gpt2-medium at the seed's setting (4 rows x 80 tokens = 320 rows
M, hidden 1024, MLP 4096, q/k/v joined 3072, 24 layers). For each projection it times, in the
compute dtype:
  - the forward product x [M, K] @ w [K, N] (the input gradient has the same shape class);
  - with N = hidden (a long contraction into few output tiles), the same product split over the
    contraction (`--split_k`): a batched product over s chunks, then a sum over s;
  - the weight gradient x^T @ dy one layer at a time, and batched over all layers at once (per layer).
With --parts=dw_adam, the weight gradient and Adam step of each projection, XLA's way against the
fused kernel (`kernels.dw_adam`) over block configurations (`--dw_adam_blocks`).
With --parts=skinny, the forward and input-gradient products as XLA runs them and as a Pallas kernel
split over the contraction (`bench.skinny_matmul`) over tile shapes (`--skinny_tiles`).
Time per call is the device's kernel time (the JAX profiler's device lines, so launch gaps are
left out); without a device timeline (CPU) it is the wall time per call.

    python -m launch.bench gemm                       # gpt2-medium, seed's setting
    python -m launch.bench gemm --rows=128 --hidden=2048 --inner=8192 --layers=16
    python -m launch.bench gemm --parts=skinny --rows=16 --skinny_cases=forward,transposed   # decode's M
"""
from __future__ import annotations

import functools
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxrl_sparse.bench.common import append_jsonl, device_info, markdown_table


def call_time_us(fn: Callable, *args, reps: int = 20, carry: Tuple[int, ...] = ()) -> Tuple[float, str]:
    """(µs per call, 'kernel' | 'wall') of jit(fn)(*args) after a warm-up call.

    carry: argument positions that are state (e.g. weights and Adam moments): they are donated and
    fn's outputs, in that order, replace them for the next call, as in a training loop."""
    from jaxrl_sparse.bench.profile import aggregate, latest_trace
    f = jax.jit(fn, donate_argnums=carry)
    args = list(args)

    def call():
        out = f(*args)
        for i, o in zip(carry, out if carry else ()):
            args[i] = o
        return out

    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory(prefix="jaxrl_gemm_") as trace:  # ~40 MB a trace: never left behind
        t = time.perf_counter()
        try:
            with jax.profiler.trace(trace):
                for _ in range(reps):
                    out = call()
                jax.block_until_ready(out)
        except RuntimeError:  # a trace is already running (`launch.bench profile gemm`): wall time only
            t = time.perf_counter()
            for _ in range(reps):
                out = call()
            jax.block_until_ready(out)
            return 1e6 * (time.perf_counter() - t) / reps, "wall"
        wall = time.perf_counter() - t
        path = latest_trace(trace)
        lines = aggregate(path, device_prefix="/device:") if path else {}
    busy = sum(v["busy_ms"] for k, v in lines.items() if "Compute" in k)  # the compute stream(s)
    if busy > 0:
        return 1e3 * busy / reps, "kernel"
    return 1e6 * wall / reps, "wall"


def split_k_product(x, w, s: int):
    """x [M, K] @ w [K, N] as s partial products over K-chunks (one batched gemm), then their sum."""
    M, K = x.shape
    return jnp.einsum("msk,skn->smn", x.reshape(M, s, K // s), w.reshape(s, K // s, w.shape[1])).sum(0)


def batched_weight_grads(xs, dys):
    """Weight gradients of L layers at once: xs [L, M, K], dys [L, M, N] -> [L, K, N]."""
    return jnp.einsum("lmk,lmn->lkn", xs, dys)


def projections(hidden: int, inner: int, qkv: int):
    """(name, K, N) of one layer's weight matrices."""
    return [("qkv", hidden, qkv), ("attn out", hidden, hidden), ("mlp up", hidden, inner), ("mlp down", inner, hidden)]


def parse_blocks(spec: str):
    """'64x128x32w4s2[t][p][gN]' -> kernels.dw_adam.Blocks(bk=64, bn=128, bm=32, num_warps=4,
    num_stages=2, transposed='t' given, prefetch='p' given, programs=N or 0)."""
    import re
    from jaxrl_sparse.errors import UserError
    from jaxrl_sparse.kernels.dw_adam import Blocks
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(t?)(p?)(?:g(\d+))?", spec.strip())
    if not m:
        raise UserError(f"blocks {spec!r}: write BKxBNxBMwWARPSsSTAGES[t][p][gPROGRAMS], e.g. 64x64x32w4s2tp "
                        "or 32x64x64w4s3tg256")
    *ints, t, p, g = m.groups()
    return Blocks(*(int(v) for v in ints), transposed=bool(t), prefetch=bool(p), programs=int(g or 0))


def block_name(b) -> str:
    return (f"{b.bk}x{b.bn}x{b.bm}w{b.num_warps}s{b.num_stages}{'t' * b.transposed}{'p' * b.prefetch}"
            f"{f'g{b.programs}' if b.programs else ''}")


def _default_blocks() -> str:
    from jaxrl_sparse.kernels.dw_adam import Blocks
    return block_name(Blocks())


# the kernel's default tiles first, then session 12's first sweep (BENCHMARKS.md)
DW_ADAM_SWEEP = (_default_blocks(), "64x64x32w4s2", "64x64x32w4s2p", "64x64x32w4s2t", "64x64x32w4s2tp",
                 "128x64x32w4s3tp", "64x128x32w4s3tp", "128x128x32w8s3tp", "64x64x64w4s3tp", "32x64x32w2s2tp",
                 "64x64x16w4s3tp")


def run_dw_adam(rows: int, projections, blocks: List[str], dtype: str = "float32",
                reps: int = 20) -> List[Dict[str, Any]]:
    """Weight gradient + Adam step of each projection: as XLA runs it (a gemm, then the elementwise
    Adam) and as the fused kernel (`kernels.dw_adam`) with each block configuration; weights and
    moments are carried (donated) from call to call. max_err: largest |difference| of the updated
    weights from XLA's after one step (TF32 products in both, summed in different orders)."""
    from jaxrl_sparse.kernels import dw_adam as fz
    hyper = fz.AdamHyper(lr=1e-5)
    corr = fz.corrections(jnp.int32(3), hyper)
    key = jax.random.key(1)
    out = []
    for name, K, N in projections:
        ks = jax.random.split(jax.random.fold_in(key, K * 7 + N), 5)
        x = jax.random.normal(ks[0], (rows, K), jnp.dtype(dtype))
        dy = (1e-3 * jax.random.normal(ks[1], (rows, N))).astype(dtype)
        state = lambda: (jax.random.normal(ks[2], (K, N)) * 0.02, 1e-4 * jax.random.normal(ks[3], (K, N)),
                         1e-8 * jax.random.uniform(ks[4], (K, N)))
        ref = jax.jit(lambda x, dy, p, m, v: fz.dw_adam_reference(x, dy, p, m, v, corr, hyper=hyper))
        want = ref(x, dy, *state())[0]
        base = {"product": f"{name} weight grad + Adam", "M": rows, "K": K, "N": N, "dtype": dtype}
        us, how = call_time_us(ref, x, dy, *state(), reps=reps, carry=(2, 3, 4))
        out.append({**base, "variant": "XLA: gemm, then Adam", "us_per_call": us, "timing": how, "max_err": 0.0})
        for spec in blocks:
            b = fz.fit_blocks(K, N, parse_blocks(spec))
            if b is None:
                continue
            f = lambda x, dy, p, m, v, b=b: fz.dw_adam(x, dy, p, m, v, corr, hyper=hyper, blocks=b)
            err = float(jnp.max(jnp.abs(jax.jit(f)(x, dy, *state())[0] - want)))
            us, how = call_time_us(f, x, dy, *state(), reps=reps, carry=(2, 3, 4))
            out.append({**base, "variant": f"fused {block_name(b)}", "us_per_call": us, "timing": how,
                        "max_err": err})
    return out


SKINNY_TILES = ("64x128x32w4s3", "64x128x64w4s3", "64x64x32w4s4", "64x256x32w8s3", "32x128x32w4s3",
                "16x128x64w4s4", "16x64x128w4s4", "16x256x64w4s3", "16x128x128w4s3", "16x64x64w2s4")


def skinny_sweep(M: int, K: int, N: int, tiles: List[str], sms: int = 132):
    """`bench.skinny_matmul.Tiles` to time for an [M, K] @ [K, N] product: each tile shape (spec
    BMxBNxBKwWARPSsSTAGES) with the contraction splits whose grid covers between half and 4x the SMs
    (an H100 has 132)."""
    from jaxrl_sparse.bench import skinny_matmul as sm
    out = []
    for spec in tiles:
        t = sm.parse(spec)
        for s in (1, 2, 3, 4, 6, 8, 12, 16, 32):
            c = t._replace(splits=s)
            grid = (M // c.bm) * (N // c.bn) * s
            if sm.fits(M, K, N, c) and sms // 2 <= grid <= 4 * sms:
                out.append(c)
    return out


SKINNY_CASES = ("forward", "transposed", "input_grad")


def run_skinny(rows: int, hidden: int, inner: int, qkv: int, tiles: List[str], reps: int = 20,
               cases=SKINNY_CASES):
    """Each forward (x @ W, W [K, N]) and input-gradient (dY @ Wᵀ) product of a layer, as XLA runs it
    and as `bench.skinny_matmul` (partials + their sum) over `skinny_sweep`'s tiles; forwards also
    with W stored transposed (what a [N, K] weight layout would give). max_err: vs XLA's product."""
    from jaxrl_sparse.bench import skinny_matmul as sm
    key = jax.random.key(2)
    out = []
    todo = []
    for name, K, N in projections(hidden, inner, qkv):
        todo += [(f"{name} forward", K, N, False)] * ("forward" in cases)
        todo += [(f"{name} forward, W stored [N, K]", K, N, True)] * ("transposed" in cases)
        todo += [(f"{name} input grad", N, K, True)] * ("input_grad" in cases)
    for what, K, N, trans in todo:
        ka, kb = jax.random.split(jax.random.fold_in(key, K * 7 + N + trans))
        a = jax.random.normal(ka, (rows, K))
        b = 0.03 * jax.random.normal(kb, (N, K) if trans else (K, N))
        ref = jax.jit(functools.partial(sm.reference, trans_b=trans))
        want = ref(a, b)
        base = {"product": what, "M": rows, "K": K, "N": N, "dtype": "float32"}
        us, how = call_time_us(ref, a, b, reps=reps)
        out.append({**base, "variant": "XLA", "us_per_call": us, "timing": how, "max_err": 0.0})
        for t in skinny_sweep(rows, K, N, tiles):
            f = functools.partial(sm.matmul, trans_b=trans, tiles=t)
            try:
                err = float(jnp.max(jnp.abs(jax.jit(f)(a, b) - want)))
                us, how = call_time_us(f, a, b, reps=reps)
            except Exception as e:  # a tile Triton cannot compile: report it, go on
                print(f"{what} {sm.name(t)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            out.append({**base, "variant": f"split {sm.name(t)}", "us_per_call": us, "timing": how, "max_err": err})
    return out


def run_shapes(rows: int, hidden: int, inner: int, qkv: int, layers: int, split_k: List[int],
               dtype: str = "float32", reps: int = 20) -> List[Dict[str, Any]]:
    dt = jnp.dtype(dtype)
    key = jax.random.key(0)
    counter = iter(range(1 << 30))

    def rnd(*shape):
        return jax.random.normal(jax.random.fold_in(key, next(counter)), shape, dt)

    out = []

    def add(what: str, K: int, N: int, variant: str, us: float, how: str, per: int = 1):
        out.append({"product": what, "M": rows, "K": K, "N": N, "variant": variant, "us_per_call": us / per,
                    "timing": how, "dtype": dtype})

    for name, K, N in projections(hidden, inner, qkv):
        x, w = rnd(rows, K), rnd(K, N)
        add(f"{name} forward", K, N, "x @ w", *call_time_us(lambda x, w: x @ w, x, w, reps=reps))
        for s in split_k:
            if N == hidden and K % s == 0 and s > 1:
                f = lambda x, w, s=s: split_k_product(x, w, s)
                add(f"{name} forward", K, N, f"split over K in {s}", *call_time_us(f, x, w, reps=reps))
    for name, K, N in projections(hidden, inner, qkv):
        x, dy = rnd(rows, K), rnd(rows, N)
        add(f"{name} weight grad", K, N, "one layer", *call_time_us(lambda x, dy: x.T @ dy, x, dy, reps=reps))
        xs, dys = rnd(layers, rows, K), rnd(layers, rows, N)
        us, how = call_time_us(batched_weight_grads, xs, dys, reps=reps)
        add(f"{name} weight grad", K, N, f"{layers} layers batched (per layer)", us, how, per=layers)
    return out


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    from absl import flags as _f
    fv = _f.FlagValues()
    _f.DEFINE_integer("rows", 320, "tokens per mini-batch (M): seed's setting 4 x (16 + 64)", flag_values=fv)
    _f.DEFINE_integer("hidden", 1024, "model width", flag_values=fv)
    _f.DEFINE_integer("inner", 4096, "MLP width", flag_values=fv)
    _f.DEFINE_integer("qkv", 3072, "joined q/k/v output width", flag_values=fv)
    _f.DEFINE_integer("layers", 24, "layers for the batched weight gradient", flag_values=fv)
    _f.DEFINE_list("split_k", ["2", "4", "8"], "contraction splits tried where N = hidden", flag_values=fv)
    _f.DEFINE_string("dtype", "float32", "float32 (the seed's; TF32 products on GPUs) or bfloat16", flag_values=fv)
    _f.DEFINE_integer("reps", 20, "calls per timing", flag_values=fv)
    _f.DEFINE_list("parts", ["products", "dw_adam"], "products: forward and weight-gradient gemms and "
                   "their rewrites; dw_adam: weight gradient + Adam, XLA's way and fused; skinny: forward "
                   "and input-gradient products, XLA's and the split-contraction kernel's", flag_values=fv)
    _f.DEFINE_list("skinny_tiles", list(SKINNY_TILES), "tile shapes of the split kernel "
                   "(BMxBNxBKwWARPSsSTAGES; the splits are chosen per product)", flag_values=fv)
    _f.DEFINE_list("dw_adam_blocks", list(DW_ADAM_SWEEP), "block configurations of the fused kernel "
                   "(BKxBNxBMwWARPSsSTAGES, then t: X and dY transposed first, p: weights and moments "
                   "loaded before the contraction, gN: N programs walking the tiles)", flag_values=fv)
    _f.DEFINE_list("skinny_cases", list(SKINNY_CASES), "skinny products: x @ W, x @ W "
                   "with W stored [N, K], dY @ Wᵀ", flag_values=fv)
    _f.DEFINE_string("out", "", "append JSON lines here", flag_values=fv)
    fv(["bench gemm"] + list(argv or []))
    from jaxrl_sparse.errors import UserError
    try:
        splits = [int(s) for s in fv.split_k]
    except ValueError:
        raise UserError(f"--split_k={','.join(fv.split_k)}: give whole numbers, e.g. 2,4,8") from None
    for p in fv.parts:
        if p not in ("products", "dw_adam", "skinny"):
            raise UserError(f"--parts: unknown {p!r}; choose products, dw_adam, skinny")
    for spec in fv.dw_adam_blocks:
        parse_blocks(spec)
    from jaxrl_sparse.bench import skinny_matmul as sm
    for spec in fv.skinny_tiles:
        sm.parse(spec)
    for c in fv.skinny_cases:
        if c not in SKINNY_CASES:
            raise UserError(f"--skinny_cases: unknown {c!r}; choose {', '.join(SKINNY_CASES)}")
    rows = []
    if "products" in fv.parts:
        rows += run_shapes(fv.rows, fv.hidden, fv.inner, fv.qkv, fv.layers, splits, fv.dtype, fv.reps)
    if "dw_adam" in fv.parts:
        rows += run_dw_adam(fv.rows, projections(fv.hidden, fv.inner, fv.qkv), fv.dw_adam_blocks, fv.dtype, fv.reps)
    if "skinny" in fv.parts:
        rows += run_skinny(fv.rows, fv.hidden, fv.inner, fv.qkv, fv.skinny_tiles, fv.reps, fv.skinny_cases)
    info = device_info()
    for r in rows:
        append_jsonl(fv.out or None, {"bench": "gemm", **r, **info})
    print(markdown_table(rows, [("product", "product"), ("M", "M"), ("K", "K"), ("N", "N"),
                                ("variant", "variant"), ("us_per_call", "µs / call"), ("timing", "timing"),
                                ("max_err", "max |Δ| vs XLA")]))
    print(f"device: {info['device']}")
    return rows
