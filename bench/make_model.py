"""Save a random-weight Llama of a real shape (bf16) with the embedded byte-level tokenizer, for GPU runs on a
machine with no Hub access. Random weights cost the same time and memory as trained ones.

    python bench/make_model.py llama2-7b /tmp/models/llama2-7b"""
import sys, time
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from qlora_nb.loading import tiny_tokenizer

SHAPES = {
    'tiny': dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),   # the reference scripts' tiny shape, for CPU runs
    'llama2-7b': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    'llama3-8b': dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}

def make_model(shape: str, path) -> Path:
    path = Path(path)
    if (path/'config.json').exists():
        if not (path/'tokenizer.json').exists(): tiny_tokenizer().save_pretrained(path)   # a folder saved without one
        return path
    t = time.time()
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device('cuda' if torch.cuda.is_available() else 'cpu'):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    del model
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    print(f'saved {shape} to {path} in {time.time() - t:.0f} s', flush=True)
    return path

if __name__ == '__main__':
    make_model(sys.argv[1], sys.argv[2])
