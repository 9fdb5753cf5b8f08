"""Bad input gets a clear error that names the cause."""

import pytest
import torch

import autodeploy
from autodeploy.errors import InvalidRequestError, UnsupportedModelError
from model_zoo import make_model


@pytest.fixture(scope="module")
def cm():
    return autodeploy.compile(make_model("llama"), max_batch_size=2, max_seq_len=32)


def test_unrecognised_attention_is_reported():
    from transformers import AttentionInterface

    def sigmoid_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        weights = torch.sigmoid(query @ key.transpose(-1, -2))
        return (weights @ value).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("sigmoid_test", sigmoid_attention)
    model = make_model("llama", "sigmoid_test")
    with pytest.raises(UnsupportedModelError, match="no attention layer could be converted"):
        autodeploy.compile(model, max_batch_size=2, max_seq_len=32)


def test_bidirectional_attention_is_left_alone_and_reported():
    """A mask that is not causal must never be treated as causal."""
    from transformers import AttentionInterface

    def bidirectional(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("bidir_test", bidirectional)
    model = make_model("llama", "bidir_test")
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        autodeploy.compile(model, max_batch_size=2, max_seq_len=32)


def test_encoder_only_model_is_rejected():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128))
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        autodeploy.compile(model)


def test_unsupported_dtype_is_rejected():
    with pytest.raises(UnsupportedModelError, match="dtype"):
        autodeploy.compile(make_model("llama"), dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="dtype"):
        autodeploy.compile(make_model("llama").to(torch.float64))


def test_not_a_model_is_rejected():
    with pytest.raises(UnsupportedModelError, match="expected an HF model"):
        autodeploy.compile(42)
    with pytest.raises(UnsupportedModelError, match="checkpoint directory"):
        autodeploy.compile("/nonexistent/path")


def test_prompt_longer_than_max_seq_len(cm):
    with pytest.raises(InvalidRequestError, match="max_seq_len=32"):
        cm.generate([[1] * 40])


def test_empty_prompt(cm):
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        cm.generate([[1, 2], []])


def test_token_ids_outside_vocab(cm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        cm.generate([[1, 2, 500]])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        cm.generate([[-1]])


def test_wrong_prompt_types(cm):
    with pytest.raises(InvalidRequestError, match="ints"):
        cm.generate([[1, 2.5]])
    with pytest.raises(InvalidRequestError, match="list of token ids"):
        cm.generate(["not ids"])
