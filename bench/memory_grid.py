"""Measure QLoRA's peak GPU memory over a grid of settings and print it beside `qlora_nb.memory`'s prediction.

For each model shape it builds a Llama of that shape with random bf16 weights (saved once under --store), then
for each (micro-batch, sequence length, gradient checkpointing) setting: loads it in 4 bits, adds LoRA (r=16,
all linear layers, dropout 0.05), trains a few steps with the HF Trainer and paged 8-bit AdamW in bf16, and
prints one line `RESULT {json}` with the predicted and the measured peak (`torch.cuda.max_memory_allocated`).
Each setting runs in a fresh Python process, so that nothing one leaves behind (a cached tensor, a fragmented
allocator, a CUDA error after an out-of-memory) is counted in the next. A setting that runs out of memory is
reported (status "oom") and the grid goes on.

Two recipes:
  project  qlora_nb.loading.load_model + qlora_nb.peft_model.create_peft_model: embeddings, norms and lm_head
           stay in bf16 (predicted with upcast_embeddings=False)
  plain    transformers + peft.prepare_model_for_kbit_training + get_peft_model, which casts them to float32
           (predicted with upcast_embeddings=True); this is the recipe of shared/bench/seed_recipe.py

Needs a CUDA GPU, torch, transformers, peft, bitsandbytes (no datasets). Run from the repository root:
    python bench/memory_grid.py                                  # 2 shapes x 3 settings x ckpt on/off, project recipe
    python bench/memory_grid.py --shapes llama2-7b --settings 2x2048 --ckpt on --recipe plain
"""
import argparse, gc, json, os, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's qlora_nb, not an installed one
import torch

from qlora_nb.config import QLoRAConfig
from qlora_nb.core import GiB
from qlora_nb.memory import SHAPES, llama_config, estimate_memory

SETTINGS = ('1x1024', '2x2048', '4x2048')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shapes', default='llama2-7b,llama3-8b', help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument('--settings', default=','.join(SETTINGS), help='comma list of MICROBATCHxSEQ')
    p.add_argument('--ckpt', default='on,off', help="gradient checkpointing: 'on', 'off' or 'on,off'")
    p.add_argument('--recipe', default='auto', choices=['auto', 'project', 'plain'],
                   help="'auto': the project's own loading functions when they import, else the plain recipe")
    p.add_argument('--padded', action='store_true', help='pad the last row of each batch to half length (attention mask on)')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--r', type=int, default=16)
    p.add_argument('--store', default='/tmp/models', help='where the random-weight models are saved')
    p.add_argument('--timeout', type=int, default=600, help='seconds allowed to one setting')
    p.add_argument('--one', help=argparse.SUPPRESS)  # SHAPE,MICROBATCH,SEQ,CKPT,RECIPE: measure one setting in this process
    return p.parse_args(argv)


def settings_grid(a) -> list:
    "(shape, micro_batch, seq, ckpt) for every combination asked for."
    ckpts = {'on': True, 'off': False}
    out = []
    for shape in a.shapes.split(','):
        if shape not in SHAPES: raise SystemExit(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
        for s in a.settings.split(','):
            mb, seq = (int(x) for x in s.lower().split('x'))
            out += [(shape, mb, seq, ckpts[c]) for c in a.ckpt.split(',')]
    return out


def ensure_model(shape: str, store: str) -> str:
    "The folder of a random-weight bf16 Llama of `shape`, built on the GPU and saved on first use."
    from transformers import LlamaForCausalLM
    path = os.path.join(store, shape)
    if not os.path.exists(os.path.join(path, 'config.json')):
        t = time.time()
        torch.manual_seed(0)
        with torch.device('cuda'):
            model = LlamaForCausalLM(llama_config(shape, max_position_embeddings=4096)).to(torch.bfloat16)
        model.save_pretrained(path)
        del model; gc.collect(); torch.cuda.empty_cache()
        print(f"saved {path} in {time.time() - t:.0f} s", flush=True)
    return path


def project_recipe_available() -> bool:
    "True when qlora_nb's loading and PEFT functions and bitsandbytes are installed (found without importing them)."
    from importlib.util import find_spec
    missing = [m for m in ('qlora_nb.loading', 'qlora_nb.peft_model', 'bitsandbytes') if find_spec(m) is None]
    if missing: print(f"project recipe unavailable (missing {', '.join(missing)}); using the plain recipe", flush=True)
    return not missing


def run_config(path: str, mb: int, seq: int, ckpt: bool, r: int) -> QLoRAConfig:
    return QLoRAConfig(model=path, compute_dtype='bfloat16', r=r, alpha=2 * r, dropout=0.05, target_modules='all-linear',
                       micro_batch=mb, grad_accum=1, max_length=seq, gradient_checkpointing=ckpt,
                       optimizer='paged_adamw_8bit', packing=True)


def load_project(cfg: QLoRAConfig):
    "4-bit model with LoRA through qlora_nb's own functions (embeddings and lm_head stay bf16)."
    from qlora_nb.loading import load_model
    from qlora_nb.peft_model import create_peft_model
    from qlora_nb.fast_path import speed_up
    model = create_peft_model(load_model(cfg), cfg)
    model.fast_path = speed_up(model, cfg)   # create_peft_model no longer switches the fast path on
    return model


def load_plain(cfg: QLoRAConfig):
    "4-bit model with LoRA through the plain recipe (prepare_model_for_kbit_training casts embeddings to fp32)."
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, quantization_config=bnb, device_map={'': 0}, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={'use_reentrant': False})
    return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                            target_modules=cfg.target_modules, task_type='CAUSAL_LM'))


def random_rows(n: int, seq: int, vocab: int, padded: bool) -> list:
    "Training rows of random token ids; with `padded`, every row at an odd index is half padding, masked."
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, ids in enumerate(torch.randint(0, vocab, (n, seq), generator=g)):
        row = {'input_ids': ids, 'labels': ids.clone()}
        if padded:
            mask = torch.ones(seq, dtype=torch.long)
            if i % 2: mask[seq // 2:] = 0; row['labels'][seq // 2:] = -100
            row['attention_mask'] = mask
        rows.append(row)
    return rows


def train_steps(model, cfg: QLoRAConfig, steps: int, vocab: int, padded: bool) -> float:
    "Train `steps` optimizer steps; return seconds per step."
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir='/tmp/memory_grid_out', per_device_train_batch_size=cfg.micro_batch,
                             gradient_accumulation_steps=cfg.grad_accum, max_steps=steps, learning_rate=2e-4, bf16=True,
                             optim=cfg.optimizer, logging_steps=1, report_to=[], save_strategy='no', disable_tqdm=True,
                             dataloader_num_workers=0, lr_scheduler_type='constant',
                             gradient_checkpointing=False)  # both recipes have already set checkpointing from cfg
    trainer = Trainer(model=model, args=args, train_dataset=random_rows(cfg.micro_batch * steps, cfg.max_length, vocab, padded))
    t = time.time()
    trainer.train()
    torch.cuda.synchronize()
    del trainer
    return (time.time() - t) / steps


def cuda_context_bytes() -> int:
    "GPU memory in use outside PyTorch's allocator (the CUDA context and libraries), measured now."
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def measure(shape: str, mb: int, seq: int, ckpt: bool, recipe: str, a) -> dict:
    path = ensure_model(shape, a.store)
    cfg = run_config(path, mb, seq, ckpt, a.r)
    upcast = recipe == 'plain'
    est = estimate_memory(llama_config(shape), replace(cfg, packing=not a.padded), upcast_embeddings=upcast)  # unpadded rows = packing
    res = dict(shape=shape, recipe=recipe, micro_batch=mb, seq=seq, gradient_checkpointing=ckpt, padded=a.padded,
               upcast_embeddings=upcast, r=a.r, predicted_peak_gib=round(est.peak / GiB, 3), predicted_phase=est.phase)
    model = None
    try:
        model = load_project(cfg) if recipe == 'project' else load_plain(cfg)
        res['loaded_gib'] = round(torch.cuda.memory_allocated() / GiB, 3)
        torch.cuda.reset_peak_memory_stats()
        res['s_per_step'] = round(train_steps(model, cfg, a.steps, SHAPES[shape]['vocab_size'], a.padded), 3)
        res.update(status='ok', measured_peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 3),
                   measured_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3),
                   outside_allocator_gib=round(cuda_context_bytes() / GiB, 3))
        res['error'] = round(res['predicted_peak_gib'] / res['measured_peak_gib'] - 1, 4)
    except torch.OutOfMemoryError as e:
        res.update(status='oom', measured_peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 3),
                   message=str(e).splitlines()[0][:300])
    except Exception as e:  # report and go on to the next setting
        res.update(status='error', message=f"{e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        del model
        gc.collect(); torch.cuda.empty_cache()
    return res


def device_info(recipe: str) -> dict:
    import transformers, peft, bitsandbytes
    props = torch.cuda.get_device_properties(0)
    return dict(gpu=props.name, total_memory_gib=round(props.total_memory / GiB, 2), cuda_context_gib=round(cuda_context_bytes() / GiB, 3),
                torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                bitsandbytes=bitsandbytes.__version__, recipe=recipe)


def measure_one(a):
    "Child process: measure the one setting in `a.one` and print its RESULT line."
    shape, mb, seq, ckpt, recipe = a.one.split(',')
    try: import bitsandbytes  # noqa: F401
    except ImportError: raise SystemExit('memory_grid.py needs bitsandbytes.')
    if not torch.cuda.is_available(): raise SystemExit('memory_grid.py needs a CUDA GPU.')
    torch.zeros(1, device='cuda')
    if recipe == 'device': print('DEVICE ' + json.dumps(device_info(shape)), flush=True); return
    print('RESULT ' + json.dumps(measure(shape, int(mb), int(seq), ckpt == '1', recipe, a)), flush=True)


def run_isolated(argv: list, one: str, timeout: int) -> str:
    "Run one setting in a fresh process; return its RESULT/DEVICE line, or a RESULT saying why there is none."
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, '--one', one], capture_output=True, text=True, timeout=timeout)
        lines = [l for l in p.stdout.splitlines() if l.startswith(('RESULT ', 'DEVICE '))]
        if lines: return lines[-1]
        why = (p.stderr.strip().splitlines() or ['no output'])[-1][:300]
    except subprocess.TimeoutExpired: why = f'timed out after {timeout} s'
    shape, mb, seq, ckpt, recipe = one.split(',')
    return 'RESULT ' + json.dumps(dict(shape=shape, recipe=recipe, micro_batch=int(mb), seq=int(seq), gradient_checkpointing=ckpt == '1',
                                       status='crashed', message=why))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.one: return measure_one(a)   # the parent never touches the GPU, so each child has it to itself
    recipe = a.recipe if a.recipe != 'auto' else ('project' if project_recipe_available() else 'plain')
    device = run_isolated(argv, f'{recipe},0,0,0,device', a.timeout)
    if not device.startswith('DEVICE '): raise SystemExit(json.loads(device[len('RESULT '):])['message'])
    print(device, flush=True)
    for shape, mb, seq, ckpt in settings_grid(a):
        print(run_isolated(argv, f'{shape},{mb},{seq},{int(ckpt)},{recipe}', a.timeout), flush=True)


if __name__ == '__main__':
    main()
