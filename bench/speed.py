"""Training speed of qlora_nb's path against the plain peft + bitsandbytes recipe, on a random-weight Llama of a real shape.

For each setting (micro-batch x example lengths) it trains `--warmup` + `--steps` optimizer steps, times the last
`--steps`, and prints one line `RESULT {json}` in the form of the reference scripts (shape, mode, seq, bsz, steps,
tokens_per_s, s_per_step, peak_alloc_gib, peak_reserved_gib, first_loss, last_loss) plus every step's loss and the
tokens fed and useful (not padding). tokens_per_s counts useful tokens only.

Recipes:
  project  qlora_nb's own path: load_tokenizer, load_model, create_peft_model, speed_up, run_trainer (no float32 upcast of
           embeddings and lm_head; the package's precision and optimizer: bf16 and paged 8-bit AdamW on a recent
           GPU, float32 and AdamW on the CPU) with its fast path as configured: LoRA4bit (--fast-lora), Liger's
           fused kernels on a GPU (--fused), activation offload (--offload), the form of checkpointing (--checkpointing)
  plain    the usual recipe, written out here: BitsAndBytesConfig, from_pretrained, peft's
           prepare_model_for_kbit_training (which upcasts), get_peft_model, the HF Trainer; same compute dtype,
           optimizer, data and seed as the project recipe
Both: r=16, alpha=32, dropout 0 (--dropout; the package's default, 0.05 in the usual recipe), all linear layers, gradient checkpointing, learning rate 2e-4 constant.
With --compare both run in this process on the same examples in the same order, each setting starting from the
same LoRA initialization, and a line `PARITY {json}` per setting gives the largest relative per-step loss difference.

Lengths: 'fixed' rows of --seq tokens; 'instruction' lengths drawn like an instruction dataset's (log-normal, median
--median=300 tokens, cut at --seq), right-padded per batch, or padding-free with --packing.

    python bench/speed.py --shape llama2-7b --bsz 2 8 --compare --out speed.jsonl
    python bench/speed.py --shape llama3-8b --bsz 8 --lengths instruction --packing --offload off on
    python bench/speed.py --shape llama2-7b --bsz 2 --fast-lora off --fused off     # the path without its fast parts
    python bench/speed.py --shape llama3-8b --bsz 2 --profile                   # where one step's time goes
    python bench/speed.py --shape tiny --seq 256 --steps 3 --compare          # CPU, seconds
    python bench/speed.py --table speed.jsonl unsloth.log                      # markdown table with ratios
"""
import argparse, gc, json, math, os, resource, statistics, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT/'bench')]   # the checkout's qlora_nb and make_model, not installed ones

GiB = 2**30
LR = 2e-4
MAX_POSITIONS = 4096            # make_model.py's max_position_embeddings
TOLERANCE = {'float32': 1e-4, 'bfloat16': 1e-2, 'float16': 1e-2}   # largest relative per-step loss difference allowed


def parse_args(argv=None):
    from make_model import SHAPES
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n', 2)[2])
    p.add_argument('--shape', default='tiny', choices=list(SHAPES))
    p.add_argument('--bsz', type=int, nargs='+', default=[2], help='micro-batch sizes, one setting each')
    p.add_argument('--seq', type=int, default=2048, help='tokens per row (fixed) or the longest example (instruction)')
    p.add_argument('--steps', type=int, default=12, help='timed optimizer steps')
    p.add_argument('--warmup', type=int, default=3, help='optimizer steps run before the clock starts')
    p.add_argument('--recipe', default='project', choices=['project', 'plain'])
    p.add_argument('--compare', action='store_true', help='run plain then project and compare their per-step losses')
    p.add_argument('--lengths', nargs='+', default=['fixed'], choices=['fixed', 'instruction'])
    p.add_argument('--median', type=int, default=300, help="median length of the 'instruction' examples, in tokens")
    p.add_argument('--packing', nargs='*', choices=['off', 'on'], default=['off'],
                   help="padding-free batches (DataCollatorWithFlattening); '--packing off on' runs both")
    p.add_argument('--fast-lora', choices=['on', 'off'], default='on', help='project recipe: LoRA4bit for the 4-bit LoRA layers')
    p.add_argument('--fused', choices=['on', 'off'], default='on', help="project recipe: Liger's fused kernels (on a GPU with liger-kernel)")
    p.add_argument('--offload', nargs='*', choices=['off', 'on'], default=['off'],
                   help="project recipe: activation offload; '--offload off on' runs both")
    p.add_argument('--checkpointing', choices=['reentrant', 'non-reentrant'],
                   help="project recipe: the form of gradient checkpointing (default: the package's, non-reentrant)")
    p.add_argument('--profile', action='store_true',
                   help='profile the last warm-up step (torch.profiler): kernels, GPU busy time, CPU time and the costliest operators, in the RESULT line')
    p.add_argument('--dropout', type=float, default=0.0, help="LoRA dropout (the package's default is 0; the usual recipe's 0.05)")
    p.add_argument('--r', type=int, default=16, help='LoRA rank; alpha is 2r')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--store', default='/tmp/models', help='where the random-weight models are saved')
    p.add_argument('--out', help='append each RESULT and PARITY line, as JSON, to this file')
    p.add_argument('--save-adapter', help="save the project recipe's adapter here after the last setting")
    p.add_argument('--table', metavar='FILE', nargs='+', help='print a markdown table of the results in these JSONL files or logs, then exit')
    a = p.parse_args(argv)
    if a.table: return a
    a.packing = [mode == 'on' for mode in (a.packing or ['on'])]    # a bare --packing means on
    a.offload = [mode == 'on' for mode in (a.offload or ['on'])]
    a.fast_lora, a.fused = a.fast_lora == 'on', a.fused == 'on'
    problems = [f'--bsz {b} must be 1 or more' for b in a.bsz if b < 1]
    if not 1 < a.seq <= MAX_POSITIONS: problems.append(f'--seq {a.seq} must be between 2 and {MAX_POSITIONS}')
    if a.steps < 1: problems.append(f'--steps {a.steps} must be 1 or more')
    if a.warmup < 0: problems.append(f'--warmup {a.warmup} must be 0 or more')
    if a.profile and a.warmup < 1: problems.append('--profile profiles the last warm-up step: give --warmup 1 or more')
    if a.median < 1: problems.append(f'--median {a.median} must be 1 or more')
    if a.r < 1: problems.append(f'--r {a.r} must be 1 or more')
    if not 0 <= a.dropout < 1: problems.append(f'--dropout {a.dropout} must be at least 0 and below 1')
    if a.recipe == 'plain' and not a.compare and any(a.offload): problems.append('--offload is a setting of the project recipe')
    if a.recipe == 'plain' and not a.compare and a.checkpointing: problems.append('--checkpointing is a setting of the project recipe')
    if a.save_adapter and not (a.compare or a.recipe == 'project'): problems.append('--save-adapter saves the project recipe\'s adapter')
    if problems: p.error('; '.join(problems))
    return a


# ---- data ---------------------------------------------------------------------------------------------------------

def examples(lengths_kind: str, n: int, seq: int, median: int, vocab: int, seed: int) -> list:
    "`n` training examples of random tokens: all `seq` long, or of instruction-like lengths; the same for the same arguments."
    from qlora_nb.speed import instruction_lengths, random_examples
    lengths = [seq] * n if lengths_kind == 'fixed' else instruction_lengths(n, seq, median=median, min_length=min(32, median), seed=seed)
    return random_examples(lengths, vocab, seed=seed)


# ---- the two recipes ----------------------------------------------------------------------------------------------

def scratch(name: str) -> str:
    "A folder for the Trainer's output, this process's own: two benchmarks at once must not share checkpoints."
    return str(Path(tempfile.gettempdir())/f'qlora_nb_speed_{os.getpid()}'/name)

def project_config(path: Path, a, bsz: int, steps: int):
    from qlora_nb.config import QLoRAConfig
    return QLoRAConfig(model=str(path), r=a.r, alpha=2 * a.r, dropout=a.dropout, target_modules='all-linear',
                       max_length=a.seq, packing=False, learning_rate=LR, lr_scheduler='constant', warmup_ratio=0.0,
                       max_steps=steps, micro_batch=bsz, grad_accum=1, gradient_checkpointing=True, seed=a.seed,
                       fast_lora=a.fast_lora, fused_kernels=a.fused,
                       logging_steps=1, eval_steps=10**9, save_steps=10**9, output_dir=scratch('project'))


class ProjectRecipe:
    "qlora_nb's path: load_tokenizer -> load_model -> create_peft_model -> speed_up -> run_trainer."
    name = 'project'

    def __init__(self, path: Path, a):
        from transformers import set_seed
        from qlora_nb.models import load_tokenizer
        from qlora_nb.loading import load_model
        from qlora_nb.peft_model import create_peft_model
        from qlora_nb.fast_path import speed_up
        self.a, self.cfg = a, project_config(path, a, a.bsz[0], a.warmup + a.steps)
        self.tokenizer = load_tokenizer(self.cfg, verbose=False)
        base = load_model(self.cfg, self.tokenizer)
        set_seed(a.seed)                       # the same LoRA initialization as the plain recipe
        self.model = create_peft_model(base, self.cfg)
        self.model.fast_path = speed_up(self.model, self.cfg)
        self.notes = self.model.fast_path      # what speed_up switched on, for the RESULT lines
        if a.checkpointing:                    # another form than the package's
            from qlora_nb.kbit import enable_checkpointing
            enable_checkpointing(self.model.get_base_model(), reentrant=a.checkpointing == 'reentrant')
        self.checkpointing = a.checkpointing or 'non-reentrant'
        self.fused = self.notes[0].startswith('fused kernels: on')

    def trainer(self, data: list, bsz: int, steps: int, packing: bool, offload: bool = False):
        from qlora_nb.data import TrainingData
        from qlora_nb.workflow import run_trainer
        self.runs = getattr(self, 'runs', 0) + 1       # each trainer a folder of its own: a new run never meets another's checkpoints
        cfg = replace(self.cfg, micro_batch=bsz, max_steps=steps, packing=packing, offload_activations=offload,
                      output_dir=scratch(f'project-{self.runs}'))
        return run_trainer(self.model, self.tokenizer, cfg, TrainingData(data, None, {}, 'text'), cfg.output_dir)


class PlainRecipe:
    "The usual QLoRA recipe: from_pretrained in 4 bits, prepare_model_for_kbit_training, get_peft_model, Trainer."
    name = 'plain'
    fused, notes, checkpointing = False, [], "transformers' default"

    def __init__(self, path: Path, a):
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from qlora_nb.core import choose_precision, has_cuda
        self.a, self.precision, self.cuda = a, choose_precision('auto'), has_cuda()   # same dtype as the project recipe
        dtype = self.precision.compute_dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                     device_map={'': 0} if self.cuda else 'cpu')
        if not self.cuda:   # bitsandbytes' CPU inference layout cannot train; a CPU-only detail, not part of the recipe
            from qlora_nb.loading import keep_cpu_layout_trainable
            keep_cpu_layout_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        set_seed(a.seed)
        self.model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=a.dropout,
                                                      target_modules='all-linear', task_type='CAUSAL_LM'))

    def trainer(self, data: list, bsz: int, steps: int, packing: bool, offload: bool = False):
        from transformers import Trainer, TrainingArguments, DataCollatorForSeq2Seq, DataCollatorWithFlattening
        a = self.a
        args = TrainingArguments(output_dir=scratch('plain'), per_device_train_batch_size=bsz, max_steps=steps,
                                 learning_rate=LR, lr_scheduler_type='constant', bf16=self.precision.bf16,
                                 fp16=self.precision.fp16, optim='paged_adamw_8bit' if self.cuda else 'adamw_torch',
                                 gradient_checkpointing=True, logging_steps=1, save_strategy='no', report_to=[],
                                 disable_tqdm=True, dataloader_num_workers=0, seed=a.seed, data_seed=a.seed)
        collate = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if packing
                   else DataCollatorForSeq2Seq(self.tokenizer, padding='longest', label_pad_token_id=-100))
        return Trainer(model=self.model, args=args, train_dataset=data, data_collator=collate)


RECIPES = {'project': ProjectRecipe, 'plain': PlainRecipe}


# ---- measuring ----------------------------------------------------------------------------------------------------

def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

def restore(model, state: dict):
    import torch
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state: p.copy_(state[n])

def free_memory():
    import torch
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()

def peak_rss_gib() -> float:
    "The process's peak resident memory (Linux reports KiB)."
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)

def measure(recipe, setting: dict, data: list, a) -> dict:
    "Train one setting for warm-up + timed steps; the RESULT dict."
    import torch
    from accelerate.utils import extract_model_from_parallel
    from qlora_nb.speed import StepClock, StepProfiler, TokenCounter
    cuda = torch.cuda.is_available()
    bsz, total = setting['bsz'], a.warmup + a.steps
    trainer = recipe.trainer(data, bsz, total, setting['packing'], setting['offload'])
    clock, counter = StepClock(a.warmup), TokenCounter(trainer.data_collator)
    trainer.add_callback(clock)
    profiler = StepProfiler(a.warmup - 1) if a.profile else None     # a warm-up step: the timed ones stay unprofiled
    if profiler: trainer.add_callback(profiler)
    trainer.data_collator = counter
    free_memory()
    if cuda: torch.cuda.reset_peak_memory_stats()
    trainer.train()
    extract_model_from_parallel(trainer.model, keep_fp32_wrapper=False)   # take off accelerate's autocast wrapper
    seconds, timed = clock.seconds, slice(a.warmup, total)
    useful, fed = sum(counter.useful[timed]), sum(counter.fed[timed])
    del trainer
    return dict(status='ok', shape=a.shape, mode=recipe.name, recipe=recipe.name, lengths=setting['lengths'], packing=setting['packing'],
                fast_lora=recipe.name == 'project' and a.fast_lora, fused=recipe.fused, offload=setting['offload'],
                fast_path=recipe.notes, checkpointing=recipe.checkpointing, dropout=a.dropout, r=a.r, seq=a.seq, bsz=bsz, steps=a.steps,
                warmup=a.warmup, tokens_per_s=round(useful / seconds, 1), fed_tokens_per_s=round(fed / seconds, 1),
                s_per_step=round(seconds / a.steps, 4), median_s_per_step=round(statistics.median(clock.step_seconds), 4),
                step_s=[round(t, 4) for t in clock.step_seconds], useful_tokens=useful, fed_tokens=fed,
                padding_share=round(1 - useful / fed, 4), load_s=recipe.load_s, loaded_gib=recipe.loaded_gib,
                peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GiB, 3) if cuda else None,
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3) if cuda else None,
                peak_rss_gib=peak_rss_gib(), first_loss=clock.losses[0], last_loss=clock.losses[-1], losses=clock.losses,
                device=torch.cuda.get_device_name(0) if cuda else 'cpu', **({'profile': profiler.summary} if profiler else {}))

def parity(plain: dict, project: dict, dtype: str) -> dict:
    "The largest relative difference between two runs' per-step losses, against the tolerance for `dtype`."
    diffs = [abs(p - q) / max(abs(p), 1e-12) for p, q in zip(plain['losses'], project['losses'])]
    worst = max(diffs) if diffs and len(plain['losses']) == len(project['losses']) else math.inf
    return dict(shape=plain['shape'], lengths=plain['lengths'], bsz=plain['bsz'], packing=plain['packing'], dtype=dtype, dropout=plain['dropout'],
                steps=len(diffs), max_rel_diff=worst, tolerance=TOLERANCE[dtype], ok=worst <= TOLERANCE[dtype])


def emit(kind: str, record: dict, out: str | None):
    print(f'{kind} ' + json.dumps(record), flush=True)
    if out:
        with open(out, 'a') as f: f.write(json.dumps(dict(kind=kind, **record)) + '\n')

def load_recipe(name: str, path: Path, a):
    import torch
    free_memory()
    t = time.time()
    recipe = RECIPES[name](path, a)
    recipe.load_s = round(time.time() - t, 1)
    recipe.loaded_gib = round(torch.cuda.memory_allocated() / GiB, 3) if torch.cuda.is_available() else None
    return recipe

def setting_key(s: dict) -> tuple: return s['lengths'], s['bsz'], s['packing'], s['offload']

def out_of_memory(recipe, s: dict, a, error) -> dict:
    "A RESULT for a setting that ran out of GPU memory: the run goes on with the next one."
    return dict(shape=a.shape, mode=recipe.name, recipe=recipe.name, **s, seq=a.seq, steps=a.steps, fused=recipe.fused,
                fast_lora=recipe.name == 'project' and a.fast_lora, dropout=a.dropout, status='oom', message=str(error).splitlines()[0][:300])

def run(a) -> list:
    "Every recipe over every setting; RESULT and PARITY lines printed (and appended to --out) as they come."
    import torch
    from make_model import make_model, SHAPES
    from qlora_nb.core import choose_precision
    path = make_model(a.shape, Path(a.store)/a.shape)
    vocab = SHAPES[a.shape]['vocab_size']
    settings = [dict(lengths=l, bsz=b, packing=p, offload=o) for l in a.lengths for b in a.bsz for p in a.packing for o in a.offload]
    data = {(l, b): examples(l, b * (a.warmup + a.steps), a.seq, a.median, vocab, a.seed) for l in a.lengths for b in a.bsz}
    results = {}
    for name in (['plain', 'project'] if a.compare else [a.recipe]):
        recipe = load_recipe(name, path, a)
        start = trainable_state(recipe.model)
        for s in settings:
            if s['offload'] and name == 'plain': continue      # offload is the project recipe's setting
            restore(recipe.model, start)            # every setting starts from the same adapter
            try: r = measure(recipe, s, data[s['lengths'], s['bsz']], a)
            except torch.OutOfMemoryError as error: r = out_of_memory(recipe, s, a, error)
            results[(name, *setting_key(s))] = r
            emit('RESULT', r, a.out)
        if name == 'project' and a.save_adapter:
            recipe.model.save_pretrained(a.save_adapter)
            print(f'adapter saved to {a.save_adapter}', flush=True)
        del recipe, start
        free_memory()
    if a.compare:
        dtype = str(choose_precision('auto').compute_dtype).replace('torch.', '')
        for s in settings:
            if s['offload']: continue
            plain, project = results[('plain', *setting_key(s))], results[('project', *setting_key(s))]
            if 'losses' in plain and 'losses' in project: emit('PARITY', parity(plain, project, dtype), a.out)
    return list(results.values())


# ---- the table ----------------------------------------------------------------------------------------------------

def read_results(paths: list) -> list:
    "RESULT and PARITY records from JSONL files written by --out, or from logs holding `RESULT {json}` lines (the reference scripts')."
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            kind, _, rest = line.partition(' ')
            if kind in ('RESULT', 'PARITY') and rest.startswith('{'): rows.append(dict(kind=kind, **json.loads(rest)))
            elif line.startswith('{') and Path(path).suffix == '.jsonl': rows.append(json.loads(line))   # a log's other output is not ours to read
    for r in rows:   # the reference scripts' lines: mode names the recipe; fixed-length rows, padded
        r.setdefault('kind', 'RESULT'); r.setdefault('recipe', r.get('mode'))
        r.setdefault('lengths', 'fixed'); r.setdefault('packing', False); r.setdefault('dropout', 0.05)
    return rows

def table(paths: list) -> str:
    "A markdown table of the RESULT lines in `paths`, with ratios against the plain recipe (dropout 0.05 when it ran) and Unsloth measured in the same run."
    rows = read_results(paths)
    results = [r for r in rows if r['kind'] == 'RESULT' and r.get('status', 'ok') == 'ok']
    def key(r): return r['shape'], r['bsz'], r['lengths'], r['seq']
    padded_plain = [r for r in results if r['recipe'] == 'plain' and not r['packing']]
    usual = {key(r): r for r in padded_plain if r['dropout'] == 0.05}          # the plain recipe as usually written
    same_dropout = {(*key(r), r['dropout']): r for r in padded_plain}          # else: the plain recipe at the row's dropout
    unsloth = {key(r): r for r in results if r['recipe'] == 'unsloth'}
    lines = ['| shape | bsz | lengths | recipe | useful tok/s | s/step | peak alloc GiB | x plain | x Unsloth | memory x Unsloth |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in sorted(results, key=lambda r: (r['shape'], r['lengths'], r['bsz'])):
        what = (r['recipe'] + (' (no LoRA4bit)' if r['recipe'] == 'project' and not r.get('fast_lora') else '')
                + (' + Liger' if r.get('fused') else '') + (' + offload' if r.get('offload') else '')
                + (' + reentrant' if r.get('checkpointing') == 'reentrant' else '')
                + (' + packing' if r['packing'] else '') + f", dropout {r['dropout']:g}")
        base, peer = usual.get(key(r)) or same_dropout.get((*key(r), r['dropout'])), unsloth.get(key(r))
        peak = f"{r['peak_alloc_gib']:.2f}" if r.get('peak_alloc_gib') is not None else '-'
        vs_plain = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else '-'
        vs_unsloth = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else '-'
        mem_unsloth = f"{r['peak_alloc_gib'] / peer['peak_alloc_gib']:.2f}" if peer and r.get('peak_alloc_gib') else '-'
        lines.append(f"| {r['shape']} | {r['bsz']} | {r['lengths']} | {what} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | "
                     f"{peak} | {vs_plain} | {vs_unsloth} | {mem_unsloth} |")
    for p in (r for r in rows if r['kind'] == 'PARITY'):
        lines.append(f"\nparity {p['shape']} bsz {p['bsz']} {p['lengths']}{' packed' if p['packing'] else ''}, dropout {p.get('dropout', 0.05):g}: max relative loss difference {p['max_rel_diff']:.1e} "
                     f"over {p['steps']} steps ({p['dtype']}, allowed {p['tolerance']:g}): {'ok' if p['ok'] else 'FAILED'}")
    return '\n'.join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.table: print(table(a.table)); return
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    run(a)


if __name__ == '__main__':
    main()
