"""DistilBERT sequence classifier (Flax Linen), matching `transformers.DistilBertForSequenceClassification`.

Used as the sentiment reward model (the PPO seed's `lvwerra/distilbert-imdb`). The six blocks are
stacked on a leading layer axis and run with `nn.scan`, like the decoder.

Forward pass (inference; every dropout is off), x = hidden [B, T, D]:
    x   = LayerNorm(E_word[tokens] + E_pos[arange(T)])              eps 1e-12
    per layer:
      a = softmax((x Wq + bq)(x Wk + bk)^T / sqrt(hd) + mask) (x Wv + bv) Wo + bo   (per head)
      x = LayerNorm_sa(a + x)
      x = LayerNorm_out(gelu(x W1 + b1) W2 + b2 + x)                 gelu = exact erf gelu
    logits [B, C] = relu(x[:, 0] Wpre + bpre) Wcls + bcls            x[:, 0] is the [CLS] slot
Positions are slot indices 0..T-1 and the pooled vector is slot 0, whatever the padding (as in
transformers); right padding (the BERT default, used by `ClassifierReward`) keeps both meaningful.

Parameter tree (plain dict, HF DistilBERT names; kernels are `[in, out]`):
    embeddings: {word_embeddings: {embedding [V, D]}, position_embeddings: {embedding [P, D]},
                 LayerNorm: {scale [D], bias [D]}}
    layers: {attention: {q_lin|k_lin|v_lin|out_lin: {kernel [L, D, D], bias [L, D]}},
             sa_layer_norm: {scale [L, D], bias [L, D]},
             ffn: {lin1: {kernel [L, D, F], bias [L, F]}, lin2: {kernel [L, F, D], bias [L, D]}},
             output_layer_norm: {scale [L, D], bias [L, D]}}
    pre_classifier: {kernel [D, D], bias [D]};  classifier: {kernel [D, C], bias [C]}
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Dict, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.errors import UserError

LN_EPS = 1e-12  # hard-coded in transformers' DistilBERT
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a DistilBERT sequence classifier (names follow our decoder's ModelConfig)."""
    vocab_size: int = 30522
    hidden_size: int = 768            # HF `dim`
    num_layers: int = 6               # HF `n_layers`
    num_heads: int = 12               # HF `n_heads`
    intermediate_size: int = 3072     # HF `hidden_dim` (FFN width)
    max_position_embeddings: int = 512
    num_labels: int = 2
    activation: str = "gelu"          # HF `activation`; "gelu" is the exact erf form
    pad_token_id: int = 0
    id2label: Tuple[Tuple[int, str], ...] = ((0, "NEGATIVE"), (1, "POSITIVE"))
    dtype: str = "float32"            # compute dtype of matmuls (LayerNorms and logits stay fp32)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def label_index(self, label) -> int:
        """Index of a label given as its name (`'POSITIVE'`, case-insensitive) or as an int."""
        names = {name.lower(): i for i, name in self.id2label}
        if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.isdigit()):
            i = int(label)
            if 0 <= i < self.num_labels:
                return i
        elif isinstance(label, str) and label.lower() in names:
            return names[label.lower()]
        raise UserError(f"label {label!r} is not one of this classifier's labels "
                        f"{dict(self.id2label)} (pass a name or an index 0..{self.num_labels - 1})")


def distilbert_base_config(num_labels: int = 2, **overrides) -> ClassifierConfig:
    """distilbert-base-uncased shapes (V 30522, D 768, 6 layers, 12 heads, FFN 3072, 512 positions)."""
    return dataclasses.replace(ClassifierConfig(num_labels=num_labels), **overrides)


def config_from_hf(hf: Dict[str, Any], where: str = "config.json") -> ClassifierConfig:
    """Maps a HF config.json dict to ClassifierConfig; other architectures are a UserError."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "distilbert" or (archs and "DistilBertForSequenceClassification" not in archs):
        got = ", ".join(archs) or hf.get("model_type") or "unknown"
        raise UserError(f"only DistilBERT sequence classifiers are supported: {where} is {got} "
                        f"(use a DistilBertForSequenceClassification checkpoint, or --reward_model=vader)")
    act = hf.get("activation", "gelu")
    if act not in _ACTIVATIONS:
        raise UserError(f"{where}: activation {act!r} is not supported (one of {sorted(_ACTIVATIONS)})")
    id2label = hf.get("id2label") or {}
    num_labels = len(id2label) if id2label else int(hf.get("num_labels", 2))
    labels = tuple(sorted((int(k), str(v)) for k, v in id2label.items())) or tuple(
        (i, f"LABEL_{i}") for i in range(num_labels))
    return ClassifierConfig(
        vocab_size=hf.get("vocab_size", 30522), hidden_size=hf.get("dim", 768),
        num_layers=hf.get("n_layers", 6), num_heads=hf.get("n_heads", 12),
        intermediate_size=hf.get("hidden_dim", 3072),
        max_position_embeddings=hf.get("max_position_embeddings", 512), num_labels=num_labels,
        activation=act, pad_token_id=hf.get("pad_token_id") or 0, id2label=labels)


# --------------------------------------------------------------------------- model

def _dt(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _dense(cfg: ClassifierConfig, features: int, name: str):
    return nn.Dense(features, dtype=_dt(cfg.dtype), param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(0.02), name=name)


def _ln(name: str):
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class _Block(nn.Module):
    """One post-LN transformer block; scanned over layers with carry x [B, T, D]."""
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.cfg
        a = _Attention(cfg, name="attention")(x, bias)
        x = _ln("sa_layer_norm")(a.astype(jnp.float32) + x.astype(jnp.float32))
        f = _Ffn(cfg, name="ffn")(x)
        x = _ln("output_layer_norm")(f.astype(jnp.float32) + x)
        return x, None


class _Attention(nn.Module):
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x, bias):
        """x [B, T, D]; bias [B, 1, 1, T] additive (0 for real keys, -inf-ish for padding)."""
        cfg = self.cfg
        B, T, D = x.shape
        H, hd = cfg.num_heads, cfg.head_dim
        q = _dense(cfg, D, "q_lin")(x).reshape(B, T, H, hd)
        k = _dense(cfg, D, "k_lin")(x).reshape(B, T, H, hd)
        v = _dense(cfg, D, "v_lin")(x).reshape(B, T, H, hd)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
        p = jax.nn.softmax(s + bias, axis=-1).astype(v.dtype)  # [B, H, T, T]
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, D)
        return _dense(cfg, D, "out_lin")(o)


class _Ffn(nn.Module):
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, x):
        h = _dense(self.cfg, self.cfg.intermediate_size, "lin1")(x)
        return _dense(self.cfg, self.cfg.hidden_size, "lin2")(_ACTIVATIONS[self.cfg.activation](h))


class _Embeddings(nn.Module):
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        T = tokens.shape[1]
        init = nn.initializers.normal(0.02)
        w = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")
        p = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                     name="position_embeddings")
        return _ln("LayerNorm")(w(tokens) + p(jnp.arange(T))[None])


class DistilBertClassifier(nn.Module):
    """`__call__(tokens [B, T] int, attention_mask [B, T]) -> (logits [B, C] fp32, hidden [B, T, D] fp32)`."""
    cfg: ClassifierConfig

    @nn.compact
    def __call__(self, tokens, attention_mask=None):
        cfg = self.cfg
        B, T = tokens.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {T} > max_position_embeddings {cfg.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.bool_)
        # additive key mask; finfo.min like transformers' eager path (a fully padded row stays finite)
        bias = jnp.where(attention_mask.astype(jnp.bool_), 0.0, jnp.finfo(jnp.float32).min)
        bias = bias[:, None, None, :].astype(jnp.float32)
        x = _Embeddings(cfg, name="embeddings")(tokens)
        Stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=cfg.num_layers)
        x, _ = Stack(cfg, name="layers")(x.astype(jnp.float32), bias)
        pooled = jax.nn.relu(_dense(cfg, cfg.hidden_size, "pre_classifier")(x[:, 0]))
        logits = _dense(cfg, cfg.num_labels, "classifier")(pooled)
        return logits.astype(jnp.float32), x


def _to_dict(tree):
    if hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def init_params(cfg: ClassifierConfig, key) -> Dict[str, Any]:
    """Random fp32 parameters at the config's real shapes (plain nested dict), e.g. for benchmarks."""
    variables = DistilBertClassifier(cfg).init(key, jnp.zeros((1, 2), jnp.int32))
    return _to_dict(variables["params"])


def param_shapes(cfg: ClassifierConfig) -> Dict[str, Any]:
    """The parameter tree as ShapeDtypeStructs (no allocation)."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))


def _apply(params, cfg: ClassifierConfig, tokens, attention_mask=None):
    return DistilBertClassifier(cfg).apply({"params": params}, tokens, attention_mask)


@functools.partial(jax.jit, static_argnums=(1,))
def forward(params, cfg: ClassifierConfig, tokens, attention_mask=None):
    """(logits [B, num_labels] fp32, last hidden states [B, T, D] fp32) for tokens [B, T] int
    (attention_mask 1 = real token). Jitted; `cfg` is static (a hashable frozen dataclass)."""
    return _apply(params, cfg, tokens, attention_mask)


@functools.partial(jax.jit, static_argnums=(1,))
def classify(params, cfg: ClassifierConfig, tokens, attention_mask=None):
    """logits [B, num_labels] fp32 (HF `DistilBertForSequenceClassification(...).logits`). Jitted."""
    return _apply(params, cfg, tokens, attention_mask)[0]


def encode(params, cfg: ClassifierConfig, tokens, attention_mask=None):
    """Last hidden states [B, T, D] fp32 (HF `DistilBertModel(...).last_hidden_state`)."""
    return forward(params, cfg, tokens, attention_mask)[1]


# --------------------------------------------------------------------------- weights

_BLOCK = [  # (our path inside params['layers'], HF suffix inside transformer.layer.{i}, transpose)
    ("attention/q_lin/kernel", "attention.q_lin.weight", True),
    ("attention/q_lin/bias", "attention.q_lin.bias", False),
    ("attention/k_lin/kernel", "attention.k_lin.weight", True),
    ("attention/k_lin/bias", "attention.k_lin.bias", False),
    ("attention/v_lin/kernel", "attention.v_lin.weight", True),
    ("attention/v_lin/bias", "attention.v_lin.bias", False),
    ("attention/out_lin/kernel", "attention.out_lin.weight", True),
    ("attention/out_lin/bias", "attention.out_lin.bias", False),
    ("sa_layer_norm/scale", "sa_layer_norm.weight", False),
    ("sa_layer_norm/bias", "sa_layer_norm.bias", False),
    ("ffn/lin1/kernel", "ffn.lin1.weight", True),
    ("ffn/lin1/bias", "ffn.lin1.bias", False),
    ("ffn/lin2/kernel", "ffn.lin2.weight", True),
    ("ffn/lin2/bias", "ffn.lin2.bias", False),
    ("output_layer_norm/scale", "output_layer_norm.weight", False),
    ("output_layer_norm/bias", "output_layer_norm.bias", False),
]
_TOP = [
    ("embeddings/word_embeddings/embedding", "distilbert.embeddings.word_embeddings.weight", False),
    ("embeddings/position_embeddings/embedding", "distilbert.embeddings.position_embeddings.weight", False),
    ("embeddings/LayerNorm/scale", "distilbert.embeddings.LayerNorm.weight", False),
    ("embeddings/LayerNorm/bias", "distilbert.embeddings.LayerNorm.bias", False),
    ("pre_classifier/kernel", "pre_classifier.weight", True),
    ("pre_classifier/bias", "pre_classifier.bias", False),
    ("classifier/kernel", "classifier.weight", True),
    ("classifier/bias", "classifier.bias", False),
]


def hf_to_params(state: Dict[str, np.ndarray], cfg: ClassifierConfig, where: str = "checkpoint"):
    """HF DistilBertForSequenceClassification state dict (numpy) -> our fp32 parameter tree.

    Old checkpoints' LayerNorm `gamma`/`beta` names are accepted (transformers renames them too).
    """
    state = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in state.items()}

    def get(name, transpose):
        if name not in state:
            raise UserError(f"{where} lacks tensor {name!r}: not a DistilBertForSequenceClassification "
                            f"checkpoint (re-save it with save_pretrained)")
        x = np.asarray(state[name], np.float32)
        return x.T if transpose else x

    flat = {path: get(name, t) for path, name, t in _TOP}
    for path, suffix, t in _BLOCK:
        flat["layers/" + path] = np.stack(
            [get(f"distilbert.transformer.layer.{i}.{suffix}", t) for i in range(cfg.num_layers)])
    out: Dict[str, Any] = {}
    for path, x in flat.items():
        node = out
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = x
    want = jax.tree_util.tree_map(lambda s: s.shape, param_shapes(cfg))
    got = jax.tree_util.tree_map(lambda x: x.shape, out)
    if want != got:
        raise UserError(f"{where}: tensor shapes do not match its config.json (re-save the checkpoint)")
    return out


class LoadedClassifier(NamedTuple):
    params: Dict[str, Any]
    cfg: ClassifierConfig
    tokenizer: Any        # a transformers tokenizer (fast when available)
    folder: str


def _looks_like_path(s: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that names a path is a (missing) folder."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s


def resolve_folder(folder_or_id: str) -> str:
    """A local folder as is; otherwise a hub id, from the local HF cache or downloaded.

    Downloads only config, safetensors and tokenizer files. Offline (HF_HUB_OFFLINE or no route to
    the hub), an uncached id is one UserError line rather than a long retry.
    """
    path = os.path.expanduser(folder_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or _looks_like_path(folder_or_id):
        raise UserError(f"reward model folder {folder_or_id!r} does not exist (pass a folder with "
                        f"config.json + *.safetensors, or a hub id such as lvwerra/distilbert-imdb)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise UserError(f"cannot fetch {folder_or_id!r}: huggingface_hub is missing ({e})") from e
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "vocab*",
                "special_tokens_map.json", "*.txt"]
    try:
        return snapshot_download(folder_or_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        raise UserError(f"reward model {folder_or_id!r} is not a local folder and the HF hub is not "
                        f"reachable (offline); download it elsewhere and pass its folder, or use "
                        f"--reward_model=vader")
    try:
        return snapshot_download(folder_or_id, allow_patterns=patterns)
    except Exception as e:
        raise UserError(f"cannot download {folder_or_id!r} from the HF hub: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''} (check the id, or pass a local folder)") from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_safetensors(folder: str) -> Dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards named in `*.safetensors.index.json`."""
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (f" it has only pickle weights ({', '.join(pickles)}), which are never loaded;"
                if pickles else "")
        raise UserError(f"no *.safetensors weights in {folder}:{hint} convert them once with "
                        f"transformers: AutoModelForSequenceClassification.from_pretrained(SRC)"
                        f".save_pretrained(DST) (safetensors is its default) and pass DST")
    state: Dict[str, np.ndarray] = {}
    for f in files:
        with safe_open(os.path.join(folder, f), framework="np") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    return state


def load_classifier(folder_or_id: str, *, dtype: str = "float32", with_tokenizer: bool = True) -> LoadedClassifier:
    """Loads a DistilBertForSequenceClassification from a HF folder (config.json + safetensors) or
    hub id: fp32 params (matmuls in `dtype`), config, and its tokenizer (`AutoTokenizer`)."""
    folder = resolve_folder(folder_or_id)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{folder} has no config.json (pass a HF model folder saved with save_pretrained)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from e
    cfg = dataclasses.replace(config_from_hf(hf, cfg_path), dtype=dtype)
    params = hf_to_params(read_safetensors(folder), cfg, where=folder)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise UserError(f"cannot load the tokenizer of {folder}: {type(e).__name__}: {e} "
                            f"(the folder needs tokenizer.json or vocab.txt)") from e
    return LoadedClassifier(params, cfg, tokenizer, folder)


def make_sentiment_reward(name_or_path: str, **kwargs):
    """Entry used by `jaxrl_sparse.rewards.sentiment.make_sentiment_reward`: a ClassifierReward."""
    from jaxrl_sparse.rewards.classifier_reward import ClassifierReward
    return ClassifierReward(name_or_path, **kwargs)
