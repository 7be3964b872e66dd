"""Training speed on the path users run: `train(cfg)` (what `qlora-nb train` calls) on a local jsonl dataset,
tokenized by the package, batched by its collator, with all its callbacks and a realistic checkpoint interval.

Each setting writes a jsonl of text rows longer than --seq, so that every example is cut at exactly --seq tokens
(dataset_format='text'), trains --warmup + --steps optimizer steps at grad_accum 1, and times the last --steps
between two CUDA synchronizations. It prints one line `RESULT {json}` in the form of bench/speed.py's (shape, mode,
seq, bsz, steps, tokens_per_s, s_per_step, peak_alloc_gib, peak_reserved_gib, first_loss, last_loss).
`--stock-token-count` counts tokens as the Trainer does, one read from the GPU per micro-batch, for an A/B.

    python bench/make_model.py llama2-7b /tmp/models/llama2-7b
    python bench/user_path.py --shape llama2-7b --bsz 2 8 --out user.jsonl
    python bench/user_path.py --shape tiny --seq 256 --steps 3 --warmup 1     # CPU, seconds
"""
import argparse, json, random, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT/'bench')]   # the checkout's qlora_nb and make_model, not installed ones

import torch
from transformers import TrainerCallback

GiB = 2**30


class Clock(TrainerCallback):
    "Times optimizer steps warmup+1 .. warmup+steps, and the tokens the Trainer counted in them."
    def __init__(self, warmup: int, steps: int): self.warmup, self.steps, self.start = warmup, steps, None
    def _now(self):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        return time.perf_counter()
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup: self.start, self.tokens = self._now(), state.num_input_tokens_seen
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup + self.steps:
            self.seconds, self.tokens = self._now() - self.start, state.num_input_tokens_seen - self.tokens


def write_rows(path: Path, n: int, seq: int, seed: int = 0) -> Path:
    "`n` rows of random words, each longer than `seq` characters (the byte tokenizer gives a token per character)."
    rng = random.Random(seed)
    word = lambda: ''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 9)))
    with open(path, 'w') as f:
        for _ in range(n):
            text = ''
            while len(text) < seq + 64: text += word() + ' '
            f.write(json.dumps({'text': text}) + '\n')
    return path


def run(model_dir: Path, shape: str, bsz: int, args) -> dict:
    from qlora_nb.config import get_config
    from qlora_nb.workflow import train
    from qlora_nb.monitor import TrainingMonitor
    with tempfile.TemporaryDirectory() as tmp:
        data = write_rows(Path(tmp)/'rows.jsonl', bsz * (args.warmup + args.steps) + 8, args.seq)
        cfg = get_config('tiny', model=str(model_dir), dataset=str(data), dataset_format='text', max_length=args.seq,
                         micro_batch=bsz, grad_accum=1, max_steps=args.warmup + args.steps, learning_rate=2e-4,
                         lr_scheduler='constant', warmup_ratio=0.0, eval_fraction=0.0, logging_steps=5,
                         save_steps=args.save_steps, gradient_checkpointing=True, optimizer='auto', r=16, alpha=32,
                         dropout=0.0, compute_dtype='auto', offload_activations=args.offload)
        clock = Clock(args.warmup, args.steps)
        if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
        monitor = TrainingMonitor(live=False)
        trainer = train(cfg, str(Path(tmp)/'run'), monitor=monitor, before_training=lambda t: t.add_callback(clock))
        losses = monitor.step_loss
        peak = torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None
        reserved = torch.cuda.max_memory_reserved() / GiB if torch.cuda.is_available() else None
        offload = getattr(trainer, 'offload', None) is not None
        del trainer
    return dict(shape=shape, mode='user_path' + ('_stock_token_count' if args.stock_token_count else ''), seq=args.seq,
                bsz=bsz, steps=args.steps, tokens_per_s=round(clock.tokens / clock.seconds, 1),
                s_per_step=round(clock.seconds / args.steps, 4), peak_alloc_gib=peak and round(peak, 3),
                peak_reserved_gib=reserved and round(reserved, 3), offload=offload, first_loss=losses[0], last_loss=losses[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', default='tiny')
    p.add_argument('--bsz', type=int, nargs='+', default=[2])
    p.add_argument('--seq', type=int, default=2048)
    p.add_argument('--steps', type=int, default=12)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--save-steps', type=int, default=50, help='checkpoint interval (a run of fewer steps writes none while timed)')
    p.add_argument('--offload', default='auto', help="offload_activations: 'auto' (the default), true or false")
    p.add_argument('--stock-token-count', action='store_true', help="count tokens as the Trainer does (a GPU read per micro-batch)")
    p.add_argument('--models', default='/tmp/models')
    p.add_argument('--out', help='append RESULT lines to this jsonl file')
    args = p.parse_args(argv)
    args.offload = {'true': True, 'false': False}.get(args.offload, args.offload)
    if args.stock_token_count:
        import qlora_nb.training as training
        training.QLoRATrainer._counts_tokens = lambda self, inputs: False
    from make_model import make_model
    model_dir = make_model(args.shape, Path(args.models)/args.shape)
    for bsz in args.bsz:
        result = run(model_dir, args.shape, bsz, args)
        print('RESULT', json.dumps(result), flush=True)
        if args.out:
            with open(args.out, 'a') as f: f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
    main()
