"""Our decoder, loaded through the real loading path, against transformers (tiny random models),
export back to HF, full-size parameter counts without allocation, and a 4-device sharded forward."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import hf_ref
from jaxrl_sparse.models import export_hf, forward, load_model, preset
from jaxrl_sparse.models.shapes import module_counts, param_shapes
from jaxrl_sparse.tree import count

FAMILIES = ["gpt2", "llama", "llama_untied", "qwen2", "gemma2", "gemma3"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(seed=0, B=3, T=9, V=128):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0  # left padding
    mask[2, :T - 1] = 0  # a single real token
    tokens[mask == 0] = 0
    return tokens, mask


def _close(ours, ref, mask):
    m = mask.astype(bool)
    err = np.abs(ours - ref)[m].max()
    assert err <= 1e-4 * np.abs(ref[m]).max(), err


@pytest.mark.parametrize("family", FAMILIES)
def test_load_export_parity(family, tmp_path):
    import transformers as tf
    model = hf_ref.random_hf_model(family, seed=1)
    src = tmp_path / "hf"
    shard = {"max_shard_size": "40KB"} if family == "llama" else {}  # one sharded save: the index path
    model.save_pretrained(src, safe_serialization=True, **shard)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    lm = load_model(str(src), with_tokenizer=False)
    assert lm.config.family == family.split("_")[0]
    assert lm.config.tie_embeddings == (family != "llama_untied")

    tokens, mask = _batch()
    logits = jax.jit(lambda p, t, m: forward(p, lm.config, t, m).logits)  # one compile, two calls
    ref = hf_ref.hf_logits(model, tokens, mask)
    _close(np.asarray(logits(lm.params, tokens, mask)), ref, mask)
    full = np.ones_like(mask)  # and without padding
    _close(np.asarray(logits(lm.params, tokens, full)), hf_ref.hf_logits(model, tokens, full), full)

    # export -> transformers reload -> same logits; and our loader round-trips bit-exactly
    out = export_hf(str(tmp_path / "export"), lm.config, lm.params)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    back = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert back.num_parameters() == model.num_parameters()
    _close(hf_ref.hf_logits(back, tokens, mask), ref, mask)
    lm2 = load_model(out, with_tokenizer=False)
    assert lm2.config == lm.config.replace(pad_token_id=lm2.config.pad_token_id)
    for a, b in zip(jax.tree_util.tree_leaves(lm.params), jax.tree_util.tree_leaves(lm2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_sharded_bf16(tmp_path):
    """Sharded bf16 export: index + shards, transformers loads it, our loader reads bf16."""
    import torch
    import transformers as tf
    model = hf_ref.random_hf_model("qwen2", seed=2)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    lm = load_model(str(tmp_path / "src"), with_tokenizer=False)
    out = export_hf(str(tmp_path / "bf16"), lm.config, lm.params, dtype="bfloat16", max_shard_bytes=20_000)
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    back = tf.AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16
    lm16 = load_model(out, with_tokenizer=False, param_dtype="bfloat16")
    leaf = jax.tree_util.tree_leaves(lm16.params)[0]
    assert leaf.dtype == jax.numpy.bfloat16
    w = back.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(lm16.params["layers"]["attn"]["q_proj"]["kernel"][0],
                                             np.float32), w.T)


# Published parameter counts (HF num_parameters(): tied embeddings counted once).
PUBLISHED = {"gpt2-medium": 354_823_168, "qwen2.5-1.5b": 1_543_714_304, "gemma-2-2b": 2_614_341_888}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_param_counts(name):
    """jax.eval_shape counts == published == transformers' model built on the meta device."""
    import torch
    import transformers as tf
    from jaxrl_sparse.models import to_hf_config
    cfg = preset(name)
    shapes = param_shapes(cfg)  # ShapeDtypeStructs: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
    n = count(shapes)
    assert n == PUBLISHED[name]
    assert module_counts(shapes)["total"] == n
    hf = to_hf_config(cfg)
    hf_cfg = tf.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device("meta"):
        ref = tf.AutoModelForCausalLM.from_config(hf_cfg)
    assert ref.num_parameters() == n


def test_sharded_forward_matches_single_device(tmp_path):
    """Params (kernels split over 'model') and batch (over 'data') on 4 fake CPU devices."""
    code = textwrap.dedent("""
        import os, sys
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        assert jax.device_count() == 4, jax.devices()
        from jaxrl_sparse.models import forward, init_params, preset
        from jaxrl_sparse.models.config import ModelConfig
        cfg = ModelConfig("qwen2", 128, 64, 96, 2, 4, 2, 16, 64, qkv_bias=True)
        params = init_params(cfg, jax.random.PRNGKey(0))
        tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 8), 0, 128)
        mask = jnp.ones((4, 8), jnp.int32).at[1, :3].set(0)
        single = np.asarray(jax.jit(lambda p, t, m: forward(p, cfg, t, m).logits)(params, tokens, mask))
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
        def spec(path, x):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            if name.endswith("kernel") and x.ndim == 3:  # [L, in, out]: split the output features
                return NamedSharding(mesh, P(None, None, "model"))
            return NamedSharding(mesh, P())
        sp = jax.device_put(params, jax.tree_util.tree_map_with_path(spec, params))
        batch = NamedSharding(mesh, P("data", None))
        st, sm = jax.device_put(tokens, batch), jax.device_put(mask, batch)
        assert len(sp["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 4
        out = jax.jit(lambda p, t, m: forward(p, cfg, t, m).logits)(sp, st, sm)
        assert len(out.sharding.device_set) == 4
        err = float(np.abs(np.asarray(out) - single).max())
        assert err < 1e-5, err
        print("OK", err)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout
