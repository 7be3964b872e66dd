"""GGUF export beyond the embedded tokenizer: byte-level BPE tokenizers with merges, split as Qwen2 and Llama 3 split
text, tokenize in llama.cpp as in transformers; the wrong split is caught; an architecture the export does not know is
refused before anything is written."""
import json
import pytest, torch
from tokenizers import Tokenizer, Regex, models, normalizers, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, AutoModelForCausalLM, GPTNeoXConfig

from qlora_nb.export import SPLITS, write_gguf, check_gguf, read_tokenizer
from qlora_nb.models import tiny_tokenizer

SPLIT_OF = {name: rule for rule, name in SPLITS.items()}
CORPUS = ["The year 2024 had 366 days; 1234567 is a number.", "Don't stop: it's 42, we'll see 3.14159 and 100000.",
          "Qwen and Llama split digits differently: 987654321 or 12 345 678.", "naïve café, 日本語 and emoji 🙂 too",
          "x = f(3) + 42; print(x)  # done\n\n\tindented", "Mixing CASE and 'Quotes' with ABC123def and 55 apples.",
          "obj.attr(value) and (paren) and _under.score"] * 20
TEXTS = ["In 2024 there were 1234567 tokens.", "It's 3.14159, isn't it?", "987654321 and 12 345", "café 日本語 🙂 ok",
         "def g(y):\n    return y * 100000", "print(x) and obj.attr(value)"]

def bpe_tokenizer(rule: str, nfc: bool) -> PreTrainedTokenizerFast:
    "A byte-level BPE trained on CORPUS, splitting text by `rule` first, as Qwen2's and Llama 3's tokenizer.json do."
    tok = Tokenizer(models.BPE(unk_token=None))
    if nfc: tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rule), behavior='isolated'),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>', '<|im_start|>'],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>', pad_token='<|endoftext|>')

def tiny_qwen2(vocab: int):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).eval()

@pytest.mark.parametrize('name, nfc', [('qwen2', True), ('llama-bpe', False)])
def test_a_tokenizer_with_merges_tokenizes_in_llama_cpp_as_in_transformers(name, nfc, tmp_path):
    tokenizer = bpe_tokenizer(SPLIT_OF[name], nfc)
    assert len(json.loads(tokenizer.backend_tokenizer.to_str())['model']['merges']) > 50   # merges that span digits and words
    assert read_tokenizer(tokenizer, len(tokenizer), None)['pre'] == name                  # recognised by its split rule
    model = tiny_qwen2(len(tokenizer))
    check = check_gguf(write_gguf(model, tokenizer, tmp_path/'model.gguf'), model, tokenizer, TEXTS)
    assert check['tokenization'] == 1.0 and check['decisive_agreement'] == 1.0

@pytest.mark.parametrize('name, nfc, wrong', [('llama-bpe', False, 'qwen2'), ('qwen2', True, 'gpt-2')])
def test_the_wrong_split_is_caught(name, nfc, wrong, tmp_path):
    "The check is sensitive to the split: Llama 3's digits in threes or Qwen2's '(x' as one piece, written as another split, differ."
    tokenizer = bpe_tokenizer(SPLIT_OF[name], nfc)
    model = tiny_qwen2(len(tokenizer))
    check = check_gguf(write_gguf(model, tokenizer, tmp_path/'model.gguf', tokenizer_pre=wrong), model, tokenizer, TEXTS)
    assert check['tokenization'] < 1.0

def test_an_unknown_split_or_architecture_is_refused_before_writing(tmp_path):
    odd = bpe_tokenizer(r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+", nfc=False)
    with pytest.raises(ValueError, match='pass tokenizer_pre='):
        write_gguf(tiny_qwen2(len(odd)), odd, tmp_path/'a.gguf')
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=288, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2))
    with pytest.raises(ValueError, match="architecture 'gpt_neox'.*supported: llama"):
        write_gguf(neox, tiny_tokenizer(), tmp_path/'b.gguf')
    assert list(tmp_path.iterdir()) == []
