"""A real (tokenizers-library) character BPE tokenizer small enough for the tiny test models.

Vocabulary: <unk>=0, <s>=1 (BOS, prepended by default), </s>=2 (EOS, also the pad token),
then printable ASCII characters and three merges (' t', 'th', 'he'), fewer than 128 ids.
The merge ' t' makes `tok("I say ")` not a prefix of `tok("I say the")`, which exercises the
scorer's prompt/continuation seam handling.
"""
from __future__ import annotations

import string


def tiny_tokenizer(extra_tokens: int = 0):
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set(string.ascii_letters + string.digits + " .,!?'-:"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    merges = [(" ", "t"), ("h", "e"), ("t", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="</s>")
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok
