"""DistilBERT classifier: logit parity with transformers, loader errors, the classifier reward."""
import json
import os

import jax
import numpy as np
import pytest

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models import classifier as clf
from jaxrl_sparse.rewards.classifier_reward import ClassifierReward

WORDS = ("good great fine love best fun bad awful boring worst hate dull the a movie film was is "
         "and it i this plot acting very not so").split()


def _tiny_tokenizer():
    """A real WordPiece tokenizer over a small vocab (BERT specials, lower-casing; transformers v5 API)."""
    from transformers import DistilBertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ing", "##ed", ".", ",", "!"]
    return DistilBertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                                   model_max_length=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random DistilBertForSequenceClassification saved as safetensors + tokenizer in a folder."""
    import torch
    import transformers as tf
    folder = str(tmp_path_factory.mktemp("distilbert"))
    tok = _tiny_tokenizer()
    config = tf.DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                 max_position_embeddings=24, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                 label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    model = tf.DistilBertForSequenceClassification(config).float().eval()
    with torch.no_grad():  # every tensor random (LayerNorm weights too) so no term is trivially 0/1
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, model, tok


def _hf(model, tokens, mask):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


@pytest.mark.parametrize("side", ["right", "left"])
def test_logit_parity_with_transformers(tiny, side):
    folder, model, _ = tiny
    loaded = clf.load_classifier(folder, with_tokenizer=False)
    assert loaded.cfg.num_layers == 2 and loaded.cfg.label_index("positive") == 1
    rng = np.random.default_rng(1)
    B, T = 4, 11
    tokens = rng.integers(5, loaded.cfg.vocab_size, (B, T)).astype(np.int32)
    lengths = np.array([11, 7, 3, 1])
    ar = np.arange(T)[None]
    mask = (ar < lengths[:, None]) if side == "right" else (ar >= T - lengths[:, None])
    mask = mask.astype(np.int32)
    tokens = np.where(mask == 1, tokens, 0)
    want_logits, want_hidden = _hf(model, tokens, mask)
    logits, hidden = map(np.asarray, clf.forward(loaded.params, loaded.cfg, tokens, mask))
    assert np.abs(want_logits).max() > 0.1  # a real comparison, not of zeros
    assert np.abs(logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    real = mask.astype(bool)
    assert np.abs(hidden[real] - want_hidden[real]).max() <= 1e-4 * np.abs(want_hidden).max()


def test_reward_is_logit_difference(tiny):
    import torch
    folder, model, tok = tiny
    texts = ["the movie was great", "boring , dull and bad plot !", "i love it",
             " ".join(["the film was very good and fun"] * 8),  # longer than 24 positions: truncated
             "", "awful acting", "best film"]
    reward = ClassifierReward(folder, "POSITIVE", "NEGATIVE", batch_size=4)
    assert reward.max_length == 24
    got = reward(texts)  # short texts run in a 16-column bucket, HF pads all to 24: padding-invariant
    enc = tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 24
    with torch.no_grad():
        logits = model(**enc).logits.numpy()
    want = logits[:, 1] - logits[:, 0]
    assert got.dtype == np.float32 and got.shape == (len(texts),)
    assert np.abs(want).max() > 0.1 and np.std(want) > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(logits).max())
    np.testing.assert_allclose(reward.logits(texts), logits, atol=1e-4 * np.abs(logits).max())
    # swapping labels flips the sign; neg_label=None is the raw positive logit
    np.testing.assert_allclose(ClassifierReward(folder, 0, 1, loaded=reward.model)(texts), -got, atol=1e-5)
    np.testing.assert_allclose(ClassifierReward(folder, "POSITIVE", None, loaded=reward.model)(texts),
                               logits[:, 1], atol=1e-4 * np.abs(logits).max())
    np.testing.assert_allclose(reward.score_pairs(["the movie ", "i "], ["was great", "love it"]),
                               got[[0, 2]], atol=1e-5)


def test_make_sentiment_reward_serves_distilbert(tiny):
    from jaxrl_sparse.rewards.sentiment import make_sentiment_reward
    folder, _, _ = tiny
    r = make_sentiment_reward(folder, batch_size=4)
    assert isinstance(r, ClassifierReward)
    ref = ClassifierReward(folder)
    np.testing.assert_allclose(r(["good movie", "bad movie"]), ref(["good movie", "bad movie"]), atol=1e-6)


def test_loader_errors(tiny, tmp_path):
    folder, _, _ = tiny
    with pytest.raises(UserError, match="does not exist"):
        clf.load_classifier(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not reachable|offline"):  # conftest sets HF_HUB_OFFLINE=1
        clf.load_classifier("someone/not-a-cached-model")
    with pytest.raises(UserError, match="label 'happy'"):
        ClassifierReward(folder, "happy", "NEGATIVE")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="only DistilBERT sequence classifiers are supported: .*GPT2LMHeadModel"):
        clf.load_classifier(str(other))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\)"):
        clf.load_classifier(str(pickled))


def test_distilbert_base_shapes_without_allocation():
    cfg = clf.distilbert_base_config()
    shapes = clf.param_shapes(cfg)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    # DistilBertModel (distilbert-base-uncased) 66,362,880 + pre_classifier 590,592 + classifier 1,538
    assert n == 66_955_010
    assert shapes["layers"]["attention"]["q_lin"]["kernel"].shape == (6, 768, 768)
    assert shapes["layers"]["ffn"]["lin1"]["kernel"].shape == (6, 768, 3072)
    out = jax.eval_shape(lambda p: clf.classify(p, cfg, np.zeros((3, 512), np.int32)), shapes)
    assert out.shape == (3, 2)
