"""A/B of the fast path's parts in one process, on one loaded model, and the CPU time of single calls. On the GPU
machine, after bench/gpu_speed.sh has installed the wheels (or with PYTHONPATH set the same way):

    python bench/ab.py llama2-7b 2 1 ab,calls,micro      # shape, micro-batch, rounds, what

`ab` trains the same steps with each variant (the MLP as one function or layer by layer, PyTorch's or Liger's
RMSNorm, bitsandbytes' optimizer step or the one-wait step, offload off or on), alternating the order every round,
and prints one `AB {json}` line per variant (also appended to $OUT/ab.jsonl). `calls` times single calls with the
GPU queue kept short (CPU time, then wall time, in microseconds): norms, the MLP, attention, a whole layer, the
optimizer step; `micro` does the same for SDPA by backend and OffloadActivations' hooks, on random tensors. `ab`
also runs on the CPU (tiny shape)."""
import sys, os, json, time, torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))); sys.path[:0] = [ROOT, os.path.join(ROOT, 'bench')]
import speed as S
from make_model import make_model, SHAPES
from transformers import Trainer
from qlora_nb.speed import use_fast_lora, fused_mlps, use_torch_rms_norm
from qlora_nb.training import QLoRATrainer, one_sync_optimizer

shape, bsz, rounds, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(',')
OUT = os.environ.get('OUT', '/tmp')
a = S.parse_args(['--shape', shape, '--bsz', str(bsz), '--steps', '6', '--warmup', '2', '--seq', '2048'])
recipe = S.load_recipe('project', make_model(shape, f'/tmp/models/{shape}'), a); model = recipe.model
print('loaded', recipe.notes, flush=True)
start = S.trainable_state(model)
data = S.examples('fixed', bsz * (a.warmup + a.steps), 2048, 300, SHAPES[shape]['vocab_size'], 0)
norms = [m for m in model.modules() if type(m).__name__.endswith('RMSNorm')]
ONE_WAIT = QLoRATrainer.__dict__['get_optimizer_cls_and_kwargs']

def set_norm(kind: str):
    "PyTorch's rms_norm (the package's), or Liger's RMSNorm where liger-kernel imports, else transformers' own."
    if kind == 'torch': use_torch_rms_norm(model); return
    try: from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module
    except ImportError: use_torch_rms_norm(model, False); return
    for m in norms: _patch_rms_norm_module(m, eps=m.variance_epsilon)

def setup(mlps: bool, norm: str, one_wait: bool):
    set_norm(norm); use_fast_lora(model, swiglu_kernels=recipe.fused, mlps=mlps)
    QLoRATrainer.get_optimizer_cls_and_kwargs = ONE_WAIT if one_wait else staticmethod(Trainer.get_optimizer_cls_and_kwargs)

def one(mlps: bool, norm: str, one_wait: bool, offload: bool, tag: str):
    setup(mlps, norm, one_wait); S.restore(model, start)
    r = S.measure(recipe, dict(lengths='fixed', bsz=bsz, packing=False, offload=offload), data, a)
    rec = dict(tag=tag, shape=shape, bsz=bsz, mlp=mlps, norm=norm, onesync=one_wait, offload=offload, losses=r['losses'],
               tok_s=r['tokens_per_s'], median_s=r['median_s_per_step'], peak=r['peak_alloc_gib'], step_s=r['step_s'],
               loss=r['last_loss'], fused_mlps=fused_mlps(model))
    print('AB', json.dumps(rec), flush=True)
    with open(f'{OUT}/ab.jsonl', 'a') as f: f.write(json.dumps(rec) + '\n')

if 'ab' in what:    # from the path before these changes to the package's, one part at a time; then both with offload
    variants = [(False, 'liger', False, False), (False, 'torch', False, False), (False, 'torch', True, False), (True, 'torch', True, False),
                (False, 'liger', False, True), (True, 'torch', True, True)]
    for rnd in range(rounds):
        for v in (variants if rnd % 2 == 0 else variants[::-1]): one(*v, tag=f'round{rnd}')

def cpu_us(fn, n: int = 100) -> tuple:
    "(CPU, wall) microseconds per call of `fn`: the loop's time before and after waiting for the GPU."
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    c = (time.perf_counter() - t) / n * 1e6; torch.cuda.synchronize(); w = (time.perf_counter() - t) / n * 1e6
    return round(c, 1), round(w, 1)

if 'calls' in what and torch.cuda.is_available():
    import bitsandbytes as bnb
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
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params: p.grad = torch.zeros_like(p)
    for cls in (bnb.optim.AdamW, one_sync_optimizer(bnb.optim.AdamW)):
        opt = cls(params, lr=1e-5, optim_bits=8, is_paged=True)
        print('CALL optimizer step', cls.__name__, len(params), 'params', cpu_us(opt.step, 10), flush=True)
        del opt

if 'micro' in what and torch.cuda.is_available():
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from qlora_nb.speed import OffloadActivations
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
