"""Save a random-weight model of a real shape (bf16) with the embedded byte-level tokenizer, for GPU runs on a
machine with no Hub access. Random weights cost the same time and memory as trained ones. The shapes are the memory
estimator's (`qlora_nb.memory.SHAPES`: Llama-2-7B, Llama-3-8B, Qwen2.5-7B) and a tiny one for CPU runs.

    python bench/make_model.py llama2-7b /tmp/models/llama2-7b"""
import sys, time
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from qlora_nb.models import tiny_tokenizer
from qlora_nb.memory import SHAPES as ESTIMATOR_SHAPES

SHAPES = {
    'tiny': dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),   # the reference scripts' tiny shape, for CPU runs
    **ESTIMATOR_SHAPES,
}

def model_type(shape: str) -> str:
    "transformers' model type of a shape: Qwen2 for the Qwen shapes (biases on q, k, v), Llama for the rest."
    return 'qwen2' if shape.startswith('qwen') else 'llama'

def build(shape: str) -> torch.nn.Module:
    "The model of `shape`, with random weights, on the current default device."
    fields = {k: v for k, v in SHAPES[shape].items() if k != 'attention_bias'}   # Qwen2 always has them; Llama none
    if model_type(shape) == 'qwen2':
        return Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=False, **fields))
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **fields))

def make_model(shape: str, path) -> Path:
    path = Path(path)
    if (path/'config.json').exists():
        if not (path/'tokenizer.json').exists(): tiny_tokenizer().save_pretrained(path)   # a folder saved without one
        return path
    t = time.time()
    torch.manual_seed(0)
    with torch.device('cuda' if torch.cuda.is_available() else 'cpu'):
        model = build(shape).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    del model
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    print(f'saved {shape} ({n / 1e9:.2f}B parameters) to {path} in {time.time() - t:.0f} s', flush=True)
    return path

if __name__ == '__main__':
    make_model(sys.argv[1], sys.argv[2])
