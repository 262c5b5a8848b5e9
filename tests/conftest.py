"""Test set-up: CPU JAX, repo root importable, tests/ importable (hf_ref)."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402

TINY_LM = dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (from the packaged GGUF), loaded once per session."""
    from jaxrl_sparse.models import load_tokenizer
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm2_tokenizer):
    """A HF folder with a tiny random Llama (2 layers, D=64) and the SmolLM2 tokenizer.

    Fast to load and run on a CPU, with a real vocabulary and chat template, so trainers and
    launchers can be tested end to end (`--model=<this folder>`).
    """
    import jax
    from jaxrl_sparse.models import export_hf
    from jaxrl_sparse.models.config import ModelConfig
    from jaxrl_sparse.models.decoder import init_params
    tok = smollm2_tokenizer
    cfg = ModelConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **TINY_LM)
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    path = tmp_path_factory.mktemp("tiny_lm") / "tiny-llama"
    export_hf(str(path), cfg, params, tok)
    return str(path)


# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder` (pytest-xdist): a file is one
# unit of work (its module fixtures run once), handed out in collection order. Files are collected
# slowest first (measured on the 2-core CI CPU) so that both workers stay busy to the end; unlisted
# files follow in their usual order. (xdist's `loadgroup` does not group on pytest 9.2: xdist #1386.)
SLOW_FILES_FIRST = ("test_parallel.py", "test_ppo.py", "test_np_capture.py", "test_es.py", "test_generate.py",
                    "test_smollm2.py", "test_es_multidevice.py", "test_grpo.py", "test_models_parity.py",
                    "test_analysis.py", "test_score.py", "test_lora.py", "test_score_analyze_mesh.py", "test_bench.py",
                    "test_ranks_methods.py", "test_classifier.py", "test_hub.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))   # stable: a file keeps its order
