"""A/B of the fast path's parts in one process, on one loaded model, and the CPU time of single calls. On the GPU
machine, after bench/gpu_speed.sh has installed the wheels (or with PYTHONPATH set the same way):

    python bench/ab.py llama2-7b 2 1 ab,calls,micro      # shape, micro-batch, rounds, what

`ab` trains the same steps with each variant (the MLP as one function or layer by layer, PyTorch's or Liger's
RMSNorm, bitsandbytes' optimizer step, the one-wait step or the flat one, offload off or on), alternating the order
every round, and prints one `AB {json}` line per variant (also appended to $OUT/ab.jsonl); `opt` does the same for
the optimizer steps alone, with and without offload. `calls` times single calls with the GPU queue kept short (CPU
time, then wall time, in microseconds): norms, the MLP, attention, a whole layer, then the optimizer steps as in
`optimizer`, which also checks that they make the same weights; `micro` does the same for SDPA by backend and
OffloadActivations' hooks, on random tensors. `walkab` trains with the Trainer's own walks over the model and with
`quick_walks`, without and with offload; `walks` times those walks (ms of CPU); `pyprof` prints the functions that
took the most of one step's Python time (cProfile). `ab`, `opt`, `walkab`, `walks` and `pyprof` also run on the CPU
(tiny shape)."""
import sys, os, json, time, torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path[:0] = [ROOT, os.path.join(ROOT, 'bench')]
import speed as S
from make_model import make_model, SHAPES
from transformers import Trainer
from qlora_nb.fast_path import use_fast_lora, fused_mlps, use_torch_rms_norm, FastTrainer, one_sync_optimizer, flat_optimizer

shape, bsz, rounds, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(',')
OUT = os.environ.get('OUT', '/tmp')
a = S.parse_args(['--shape', shape, '--bsz', str(bsz), '--steps', '6', '--warmup', '2', '--seq', '2048'])
recipe = S.load_recipe('project', make_model(shape, f'/tmp/models/{shape}'), a); model = recipe.model
print('loaded', recipe.notes, flush=True)
start = S.trainable_state(model)
data = S.examples('fixed', bsz * (a.warmup + a.steps), 2048, 300, SHAPES[shape]['vocab_size'], 0)
norms = [m for m in model.modules() if type(m).__name__.endswith('RMSNorm')]
def one_wait_optimizer(args, model=None) -> tuple:
    "bitsandbytes' class with one wait per step, each adapter stepped on its own: the step before the flat one."
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return one_sync_optimizer(optimizer_cls), kwargs

OPTIMIZERS = {'flat': FastTrainer.__dict__['get_optimizer_cls_and_kwargs'],      # the package's
              'one-wait': staticmethod(one_wait_optimizer), 'bitsandbytes': staticmethod(Trainer.get_optimizer_cls_and_kwargs)}

def set_norm(kind: str):
    "PyTorch's rms_norm (the package's), or Liger's RMSNorm where liger-kernel imports, else transformers' own."
    if kind == 'torch': use_torch_rms_norm(model); return
    try: from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module
    except ImportError: use_torch_rms_norm(model, False); return
    for m in norms: _patch_rms_norm_module(m, eps=m.variance_epsilon)

def setup(mlps: bool, norm: str, optim: str):
    set_norm(norm); use_fast_lora(model, swiglu_kernels=recipe.fused, mlps=mlps)
    FastTrainer.get_optimizer_cls_and_kwargs = OPTIMIZERS[optim]

def one(mlps: bool, norm: str, optim: str, offload: bool, tag: str):
    setup(mlps, norm, optim); S.restore(model, start)
    r = S.measure(recipe, dict(lengths='fixed', bsz=bsz, packing=False, offload=offload), data, a)
    rec = dict(tag=tag, shape=shape, bsz=bsz, mlp=mlps, norm=norm, optimizer=optim, offload=offload, losses=r['losses'],
               tok_s=r['tokens_per_s'], median_s=r['median_s_per_step'], peak=r['peak_alloc_gib'], step_s=r['step_s'],
               loss=r['last_loss'], fused_mlps=fused_mlps(model))
    print('AB', json.dumps(rec), flush=True)
    with open(f'{OUT}/ab.jsonl', 'a') as f: f.write(json.dumps(rec) + '\n')

if 'ab' in what:    # from the path before these changes to the package's, one part at a time; then both with offload
    variants = [(False, 'liger', 'bitsandbytes', False), (False, 'torch', 'bitsandbytes', False), (False, 'torch', 'one-wait', False),
                (True, 'torch', 'one-wait', False), (True, 'torch', 'flat', False), (False, 'liger', 'bitsandbytes', True), (True, 'torch', 'flat', True)]
    for rnd in range(rounds):
        for v in (variants if rnd % 2 == 0 else variants[::-1]): one(*v, tag=f'round{rnd}')

if 'opt' in what:   # the optimizer steps alone, the rest as the package runs it; without and with offload
    variants = [(True, 'torch', optim, offload) for offload in (False, True) for optim in ('one-wait', 'flat')]
    for rnd in range(rounds):
        for v in (variants if rnd % 2 == 0 else variants[::-1]): one(*v, tag=f'opt-round{rnd}')

def cpu_us(fn, n: int = 100) -> tuple:
    "(CPU, wall) microseconds per call of `fn`: the loop's time before and after waiting for the GPU."
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    c = (time.perf_counter() - t) / n * 1e6; torch.cuda.synchronize(); w = (time.perf_counter() - t) / n * 1e6
    return round(c, 1), round(w, 1)

if 'pyprof' in what:   # where the Python time of one step goes (cProfile, step 3 of 4, the package's path): the top functions by own time
    import cProfile, pstats, io
    from transformers import TrainerCallback
    class PythonProfile(TrainerCallback):
        profile = None
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2: self.profile = cProfile.Profile(); self.profile.enable()
        def on_step_end(self, args, state, control, **kwargs):
            if self.profile is None or state.global_step != 3: return
            self.profile.disable(); text = io.StringIO()
            stats = pstats.Stats(self.profile, stream=text).sort_stats('tottime')
            stats.print_stats(45); stats.print_callers('_named_members|\\(parameters\\)|\\(train\\)|zero_grad')
            print('PYPROF', text.getvalue(), flush=True)
    setup(True, 'torch', 'flat'); S.restore(model, start)
    trainer = recipe.trainer(data, bsz, 4, False, False)
    trainer.add_callback(PythonProfile()); trainer.train(); del trainer

if 'walkab' in what:   # the package's path with the Trainer's own walks over the model, or quick_walks' (the package's); offload off and on
    QUICK = (FastTrainer.__dict__['train'], FastTrainer.__dict__['_clip_grad_norm'])
    def walks(quick: bool):
        FastTrainer.train, FastTrainer._clip_grad_norm = QUICK if quick else (Trainer.train, Trainer._clip_grad_norm)
    for rnd in range(rounds):
        for quick in ((True, False) if rnd % 2 == 0 else (False, True)):
            for offload in (False, True):
                walks(quick); one(True, 'torch', 'flat', offload, tag=f'walks-{"quick" if quick else "stock"}-round{rnd}')
    walks(True)

if 'walks' in what:   # the Trainer's walks over every module, once per step: CPU time of each (ms)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params: p.grad = torch.zeros_like(p)
    def ms(fn, n=20):
        fn(); t = time.perf_counter()
        for _ in range(n): fn()
        return round((time.perf_counter() - t) / n * 1e3, 2)
    print('WALK modules', sum(1 for _ in model.modules()), 'train()', ms(lambda: model.train()), 'list(parameters())', ms(lambda: list(model.parameters())),
          'clip_grad_norm_', ms(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)),
          'clip on the adapters alone', ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)), flush=True)
    from qlora_nb.fast_path import quick_walks
    with quick_walks(model):
        print('WALK quick_walks: train()', ms(lambda: model.train()), 'zero_grad()', ms(lambda: model.zero_grad()), flush=True)

if 'calls' in what and torch.cuda.is_available():
    norm = norms[1]; x = torch.randn(bsz, 2048, norm.weight.shape[0], device='cuda', dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    for kind in ('liger', 'torch'):
        set_norm(kind)
        print('CALL norm', kind, 'fwd', cpu_us(lambda: norm(x), 200), 'fwd+bwd', cpu_us(lambda: norm(x).backward(g), 200), flush=True)
    print('CALL add', cpu_us(lambda: x + 1, 200), flush=True)
    print('CALL empty', cpu_us(lambda: torch.empty(10, device='cuda'), 200), flush=True)
    layer = model.base_model.model.model.layers[0]
    pe = model.base_model.model.model.rotary_emb(x, torch.arange(2048, device='cuda')[None].expand(bsz, -1))
    for mlps in (True, False):
        use_fast_lora(model, swiglu_kernels=recipe.fused, mlps=mlps)
        print('CALL mlp', mlps, 'fwd', cpu_us(lambda: layer.mlp(x), 50), 'fwd+bwd', cpu_us(lambda: layer.mlp(x).backward(g), 50), flush=True)
    use_fast_lora(model, swiglu_kernels=recipe.fused)
    print('CALL attn fwd+bwd', cpu_us(lambda: layer.self_attn(x, position_embeddings=pe, attention_mask=None)[0].backward(g), 50), flush=True)
    print('CALL layer fwd', cpu_us(lambda: layer(x, position_embeddings=pe, attention_mask=None), 50), flush=True)
    print('CALL layer fwd+bwd', cpu_us(lambda: layer(x, position_embeddings=pe, attention_mask=None).backward(g), 50), flush=True)

if ('calls' in what or 'optimizer' in what) and torch.cuda.is_available():
    import bitsandbytes as bnb
    params = [p for p in model.parameters() if p.requires_grad]
    def stepped(cls, flat: bool, time_it: bool):
        "Copies of the adapters after 3 steps of `cls` on seeded gradients (paged 8-bit AdamW); with `time_it`, the step's CPU and wall time."
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(ps, lr=1e-3, optim_bits=8, is_paged=True, **(dict(adapters=ps) if flat else {}))
        for k in range(3):
            torch.manual_seed(k)
            for p in ps: p.grad = torch.randn_like(p)
            opt.step()
        if time_it: print('CALL optimizer step', type(opt).__name__, len(params), 'params', cpu_us(opt.step, 10), flush=True)
        torch.cuda.synchronize()
        return [p.detach().clone() for p in ps]
    made = {name: stepped(cls, name == 'flat', True) for name, cls in (('bitsandbytes', bnb.optim.AdamW), ('one-wait', one_sync_optimizer(bnb.optim.AdamW)),
                                                                       ('flat', flat_optimizer(bnb.optim.AdamW)))}
    print('CALL optimizer weights after 3 steps equal to bitsandbytes\'', {k: all(torch.equal(a, b) for a, b in zip(made['bitsandbytes'], v)) for k, v in made.items()}, flush=True)

if 'micro' in what and torch.cuda.is_available():
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from qlora_nb.fast_path import OffloadActivations
    F = torch.nn.functional
    for kv_heads in (32, 8):
        q = torch.randn(2, 32, 2048, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True)
        k, v = [torch.randn(2, kv_heads, 2048, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
        g = torch.randn_like(q); gqa = kv_heads != 32
        run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        print('SDPA kv', kv_heads, 'default fwd', cpu_us(run), 'fwd+bwd', cpu_us(lambda: run().backward(g)), flush=True)
        for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel(b): print('SDPA kv', kv_heads, b.name, 'fwd', cpu_us(run), 'fwd+bwd', cpu_us(lambda: run().backward(g)), flush=True)
            except Exception as e: print('SDPA', b.name, 'fails', str(e)[:100])
    off = OffloadActivations()
    ts = [torch.randn(2, 2048, 4096, device='cuda', dtype=torch.bfloat16) for _ in range(32)]
    for rnd in range(3):
        with off:
            torch.cuda.synchronize(); t = time.perf_counter()
            idx = [off.pack_hook(x) for x in ts]
            pack = (time.perf_counter() - t) / 32 * 1e6
        torch.cuda.synchronize(); t = time.perf_counter()
        outs = [off.unpack_hook(i) for i in reversed(idx)]
        unpack = (time.perf_counter() - t) / 32 * 1e6
        torch.cuda.synchronize(); wall = time.perf_counter() - t
        del outs
        print(f'OFFLOAD round {rnd}: pack {pack:.0f} us, unpack {unpack:.0f} us CPU per 32 MiB tensor; unpack wall {wall * 1e3:.1f} ms for 32', flush=True)
    print('EMPTY 86MiB', cpu_us(lambda: torch.empty(4096, 11008, device='cuda', dtype=torch.bfloat16)))
    print('PINNED 32MiB', cpu_us(lambda: torch.empty(2, 2048, 4096, dtype=torch.bfloat16, pin_memory=True), 20))
    print('EVENT', cpu_us(lambda: torch.cuda.Event().record()))
