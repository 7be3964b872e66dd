"""The fast path on the CPU: LoRA4bit gives peft's losses and gradients (also with the q, k, v biases of Qwen2, and
with siblings in one call), keeps float16 sums within float16 rounding, shares a call only for the same input tensor,
hands every case it does not cover back to peft, says what it switched on and why not, decides 'auto' offload from the
tokens of a micro-batch, and changes nothing that training computes: activation offload gives the same adapter and
wraps the forward pass alone, both forms of checkpointing give the same gradients, and a NaN in any micro-batch still
stops before the optimizer step."""
from dataclasses import replace
import pytest, torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from qlora_nb.config import QLoRAConfig, ConfigError, get_config, validate, offload_wanted
from qlora_nb.models import load_tokenizer, tiny_tokenizer
from qlora_nb.loading import load_model
from qlora_nb.peft_model import create_peft_model
from qlora_nb.fast_path import use_fast_lora, speed_up, sibling_groups, fused_mlps, swiglu, swiglu_backward, use_torch_rms_norm
from qlora_nb.workflow import train
from qlora_nb.training import NonFiniteError
from qlora_nb.checkpoints import checkpoints

IDS = torch.randint(4, 250, (2, 24), generator=torch.Generator().manual_seed(0))

@pytest.fixture(scope='module')
def tiny_qwen(tmp_path_factory):
    "A 2-layer Qwen2 (biases on q, k and v) saved with the embedded tokenizer."
    path = tmp_path_factory.mktemp('qwen')
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=288, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    with torch.no_grad():   # biases start at zero: give them values, as a trained model has
        for name, p in model.named_parameters():
            if name.endswith('.bias'): p.normal_(0, 0.5)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path

def peft_model(cfg):
    torch.manual_seed(0)
    model = create_peft_model(load_model(cfg, load_tokenizer(cfg, verbose=False)), cfg)
    speed_up(model, cfg, verbose=False)
    with torch.no_grad():   # B starts at zero; random values exercise every gradient
        for n, p in model.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.05)
    return model

def loss_and_grads(model, fast: bool):
    use_fast_lora(model, fast); model.zero_grad(); torch.manual_seed(1)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_lora4bit_gives_peft_losses_and_gradients_with_biases(tiny_qwen, dropout):
    model = peft_model(QLoRAConfig(model=str(tiny_qwen), dropout=dropout, fast_lora=False, fused_kernels=False))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.bias is not None and q.base_layer.bias.abs().sum() > 0     # the bias path is exercised
    (loss_peft, g_peft), (loss_fast, g_fast) = loss_and_grads(model, False), loss_and_grads(model, True)
    assert abs(loss_peft - loss_fast) <= 1e-5 * loss_peft
    assert g_peft.keys() == g_fast.keys() and len(g_peft) == 2 * 7 * 2
    for name in g_peft:
        assert (g_peft[name] - g_fast[name]).abs().max() <= 1e-4 * g_peft[name].abs().max(), name   # float32 rounding of another summation order

def test_siblings_share_a_call_only_for_the_same_input(tiny_qwen):
    "q computes k and v with it; k called with another tensor computes itself, and a forgotten result is not reused."
    model = peft_model(QLoRAConfig(model=str(tiny_qwen), fast_lora=True, fused_kernels=False))
    attn = model.base_model.model.model.layers[0].self_attn
    assert sibling_groups(model) == 2 * 2                      # q,k,v and gate,up in each of 2 blocks
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        use_fast_lora(model, False)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in [(q, attn.q_proj(x)), (k, attn.k_proj(x)), (v, attn.v_proj(x))])
        k_other = attn.k_proj(other)
        use_fast_lora(model)
        attn.q_proj(x)                                          # leaves k's and v's results for x
        assert torch.allclose(attn.k_proj(other), k_other, atol=1e-5)   # another input: computed afresh
        assert '_lora4bit_pending' not in attn.k_proj.__dict__  # and the stale result dropped
        assert torch.allclose(attn.v_proj(x), v, atol=1e-5)

def mlp_nodes(loss) -> int:
    "How many LoRAMLP4bit nodes the autograd graph behind `loss` holds."
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen: continue
        seen.add(node); todo += [f for f, _ in node.next_functions]
    return sum('LoRAMLP4bit' in type(n).__name__ for n in seen)

def saved_wide_bytes(model, width: int) -> int:
    "Bytes of `width`-wide tensors (the MLP's inner size) that autograd keeps for one forward pass of `model`."
    total = 0
    def pack(t):
        nonlocal total
        if t.dim() and t.shape[-1] == width and not isinstance(t, torch.nn.Parameter): total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): model(input_ids=IDS, labels=IDS)
    return total

def test_mlp_as_one_function_keeps_less_and_gives_way(tiny_qwen):
    "The MLP runs as one LoRAMLP4bit when dropout is 0 (its gradients are checked against peft above), keeps two inner-size tensors per token where the layers keep four, hands dropout and disabled adapters to the forward it replaced, and puts that forward back."
    import types
    model = peft_model(QLoRAConfig(model=str(tiny_qwen), fast_lora=True, fused_kernels=False))
    mlp = model.base_model.model.model.layers[0].mlp
    assert fused_mlps(model) == 2 and mlp_nodes(model(input_ids=IDS, labels=IDS).loss) == 2
    fused = saved_wide_bytes(model, 128)
    use_fast_lora(model, mlps=False)                # gate with up, the product, then down: LoRA4bit layer by layer
    assert fused_mlps(model) == 0 and 'forward' not in mlp.__dict__ and mlp_nodes(model(input_ids=IDS, labels=IDS).loss) == 0
    layer_by_layer = saved_wide_bytes(model, 128)
    assert fused * 2 == layer_by_layer == 2 * 4 * IDS.numel() * 128 * 4     # 2 blocks: 2 against 4 [N, 128] float32 tensors each
    use_fast_lora(model, False)
    calls = []
    def earlier_forward(self, x):                   # stands for Liger's forward, bound to the module as Liger does
        calls.append(x.shape)
        return type(self).forward(self, x)
    mlp.forward = types.MethodType(earlier_forward, mlp)
    use_fast_lora(model)
    with model.disable_adapter(): model(input_ids=IDS)
    assert len(calls) == 1                          # no adapter: the earlier forward ran
    for m in model.modules():
        if hasattr(m, 'lora_dropout'): m.lora_dropout['default'] = torch.nn.Dropout(0.1)
    assert mlp_nodes(model(input_ids=IDS, labels=IDS).loss) == 0 and len(calls) == 2   # dropout: layer by layer
    use_fast_lora(model, False)
    assert mlp.forward.__func__ is earlier_forward  # put back

def test_swiglu_backward_is_the_gradient_of_silu_times_up():
    gate, up, grad = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, 7, dtype=torch.float64)
    (torch.nn.functional.silu(gate) * up).backward(grad)
    d_gate, d_up = swiglu_backward(gate.detach(), up.detach(), grad)
    assert torch.allclose(d_gate, gate.grad) and torch.allclose(d_up, up.grad)
    assert torch.equal(swiglu(gate.detach(), up.detach()), torch.nn.functional.silu(gate.detach()) * up.detach())

def test_torch_rms_norm_gives_transformers_norm_and_goes_back():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad(): norm.weight.normal_(1, 0.2)
    x, g = torch.randn(2, 8, 32, requires_grad=True), torch.randn(2, 8, 32)
    def run():
        x.grad = norm.weight.grad = None
        y = norm(x); y.backward(g)
        return y.detach(), x.grad.clone(), norm.weight.grad.clone()
    reference = run()
    assert use_torch_rms_norm(model) == 3 and 'forward' in norm.__dict__    # two per block and the final one
    for a, b in zip(reference, run()): assert torch.allclose(a, b, atol=1e-6)
    norm.to(torch.bfloat16)                          # a float32 input against a bf16 weight: transformers' own forward
    assert torch.equal(norm(x), type(norm).forward(norm, x))
    use_torch_rms_norm(model, False)
    assert 'forward' not in norm.__dict__

def test_trained_bias_goes_to_peft(tiny_qwen):
    "A bias that trains needs peft's forward, which gives it a gradient; LoRA4bit would leave it out."
    model = peft_model(QLoRAConfig(model=str(tiny_qwen), fast_lora=True, fused_kernels=False))
    bias = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias
    bias.requires_grad_(True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0

def test_cases_lora4bit_does_not_cover_go_to_peft():
    model = peft_model(QLoRAConfig(dropout=0.0, fast_lora=True, fused_kernels=False))
    model.eval()
    with torch.no_grad():
        fast = model(input_ids=IDS).logits
        with model.disable_adapter(): base_only = model(input_ids=IDS).logits     # disabled adapters: the base alone
        use_fast_lora(model, False)
        peft_logits = model(input_ids=IDS).logits
        with model.disable_adapter(): peft_base = model(input_ids=IDS).logits
    assert torch.allclose(fast, peft_logits, atol=1e-5) and torch.equal(base_only, peft_base)
    assert not torch.allclose(fast, base_only, atol=1e-3)                               # the adapter does change the output

def test_speed_up_says_what_it_switched_on_and_why_not():
    model = peft_model(QLoRAConfig(fast_lora=False, fused_kernels=False))
    notes = speed_up(model, QLoRAConfig(), verbose=False)
    assert notes[0].startswith('fused kernels: off (no CUDA GPU') if not torch.cuda.is_available() else notes[0].startswith('fused kernels:')
    assert notes[1] == 'fast LoRA: on, 28 4-bit LoRA layers through LoRA4bit, 8 groups of siblings computed together and 4 MLPs as one function'
    assert notes[2] == ('activation offload: off (auto: no CUDA GPU, nothing to move; decided again when training starts)'
                        if not torch.cuda.is_available() else notes[2])
    assert speed_up(model, QLoRAConfig(dropout=0.1), verbose=False)[1].endswith('as one function when dropout is 0')
    assert 'under FSDP' in speed_up(model, QLoRAConfig(distributed='fsdp', quant_storage='bfloat16', num_processes=2), verbose=False)[1]
    assert speed_up(model, QLoRAConfig(fast_lora=False, fused_kernels=False), verbose=False)[:2] == [
        'fused kernels: off (fused_kernels=False)', "fast LoRA: off (fast_lora=False): peft's forward"]

def test_fused_kernels_judged_for_a_gpu_being_planned_for():
    from qlora_nb.config import fused_kernels_apply, liger_status
    cfg = QLoRAConfig()
    on, why = fused_kernels_apply(cfg, 'llama', capability=(7, 5))           # a T4
    assert not on and why.startswith('compute capability 7.5')
    assert fused_kernels_apply(cfg, 'llama', capability=(9, 0)) == liger_status()   # new enough: whether Liger can run here decides
    assert fused_kernels_apply(cfg, 'gpt2', capability=(9, 0))[0] is False

def test_auto_offload_follows_the_tokens_of_a_micro_batch():
    "'auto' offloads on a GPU from 4,096 tokens per micro-batch (rows as long as the data's longest), with checkpointing; True and False are obeyed."
    on_gpu = lambda **kw: offload_wanted(QLoRAConfig(max_length=2048, **kw), cuda=True)
    assert [on_gpu(micro_batch=b)[0] for b in (1, 2, 4, 8)] == [False, True, True, True]
    assert on_gpu(micro_batch=2)[1] == 'auto: 4,096 tokens per micro-batch: the copies hide behind the computation'
    assert on_gpu(micro_batch=1)[1] == 'auto: 2,048 tokens per micro-batch, under 4,096: the copies would cost time'
    assert not offload_wanted(QLoRAConfig(micro_batch=8, max_length=2048), longest=500, cuda=True)[0]       # 4,000 tokens
    assert not on_gpu(micro_batch=8, gradient_checkpointing=False)[0]
    assert offload_wanted(QLoRAConfig(micro_batch=8, max_length=2048), cuda=False) == (False, 'auto: no CUDA GPU, nothing to move')
    assert offload_wanted(QLoRAConfig(offload_activations=True), cuda=False)[0] and not offload_wanted(QLoRAConfig(offload_activations=False), cuda=True)[0]
    with pytest.raises(ConfigError, match="offload_activations='yes' must be True, False or 'auto'"): validate(QLoRAConfig(offload_activations='yes'))

@pytest.mark.parametrize('field', ['fast_lora', 'fused_kernels', 'offload_activations'])
def test_switches_must_be_true_or_false(field):
    with pytest.raises(ConfigError, match=field): validate(QLoRAConfig(**{field: 'yes'}))

def test_offload_changes_nothing_training_computes(tmp_path):
    cfg = get_config('tiny', max_steps=4, micro_batch=16, grad_accum=2, gradient_checkpointing=True, save_steps=100, eval_steps=100)
    adapters = []
    for offload in (False, True):
        trainer = train(replace(cfg, offload_activations=offload), str(tmp_path/f"run{offload}"))
        assert (trainer.offload is not None) == offload
        adapters.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])

def test_nan_in_a_middle_micro_batch_stops_before_that_optimizer_step(tmp_path):
    cfg = get_config('tiny', max_steps=6, micro_batch=16, grad_accum=4, save_steps=2, eval_steps=1000, logging_steps=1)
    tok = load_tokenizer(cfg, verbose=False)
    model = create_peft_model(load_model(cfg, tok), cfg)
    speed_up(model, cfg, verbose=False)
    calls = {'n': 0}
    def poison(module, inputs, output):   # the second micro-batch of step 3: forward call 4 * 2 + 2
        if module.training: calls['n'] += 1
        return output * float('nan') if calls['n'] == 10 else output
    model.base_model.model.model.layers[1].mlp.register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match='Loss is nan at step 3'):     # found by the loss check, not only by the gradient's
        train(cfg, str(tmp_path), model=model, tokenizer=tok)
    assert [c.name for c in checkpoints(tmp_path)] == ['checkpoint-2']
    saved = load_file(tmp_path/'checkpoint-2'/'adapter_model.safetensors')
    now = {n.replace('.default', ''): p for n, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == now.keys() and all(torch.equal(saved[n], now[n].to(saved[n].dtype)) for n in saved)   # step 3 never stepped

def test_a_group_of_three_in_float16_matches_float32_arithmetic():
    "q, k, v as one LoRA4bit call in float16 (a T4's compute dtype), with biases: outputs and every gradient within float16 rounding of the same sums in float32, and float32 gradients for the float32 adapters."
    from bitsandbytes.functional import quantize_4bit, dequantize_4bit
    from qlora_nb.fast_path import LoRA4bit
    torch.manual_seed(0)
    d, widths, r, scaling = 64, (64, 32, 32), 4, 2.0
    packed = [quantize_4bit((torch.randn(o, d) / d**0.5).half(), quant_type='nf4', compress_statistics=True) for o in widths]
    biases = [torch.randn(o) for o in widths]
    As = [(0.1 * torch.randn(r, d)).requires_grad_() for _ in widths]
    Bs = [(0.1 * torch.randn(o, r)).requires_grad_() for o in widths]
    x = torch.randn(2, 5, d)
    x32, x16 = x.clone().requires_grad_(), x.half().requires_grad_()
    expected = [x32 @ dequantize_4bit(w, s).float().t() + b + scaling * (x32 @ A.t()) @ B.t()
                for (w, s), b, A, B in zip(packed, biases, As, Bs)]
    got = LoRA4bit.apply(x16, None, [(w, s, b.half()) for (w, s), b in zip(packed, biases)], [scaling] * 3,
                         *[t for A, B in zip(As, Bs) for t in (A, B)])
    assert [t.dtype for t in got] == [torch.float16] * 3
    upstream = [torch.randn_like(t) for t in expected]
    g32 = torch.autograd.grad(expected, [x32, *As, *Bs], upstream)
    g16 = torch.autograd.grad(got, [x16, *As, *Bs], [u.half() for u in upstream])
    assert all(g.dtype == torch.float32 for g in g16[1:])
    for a, b in [*zip(expected, got), *zip(g32, g16)]:
        assert (a - b.float()).abs().max() <= 3e-3 * a.abs().max()     # float16 keeps 11 significant bits: 4.9e-4 per rounding

def mlp_grad_modes(model, ids) -> list:
    "torch.is_grad_enabled() at each run of layer 0's MLP (inside the checkpointed part of the layer) over one forward and backward pass."
    modes = []
    hook = model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda m, a: modes.append(torch.is_grad_enabled()))
    model.train(); model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    hook.remove()
    return modes

def test_checkpointing_is_non_reentrant_and_the_reentrant_form_gives_the_same_gradients():
    from qlora_nb.kbit import enable_checkpointing
    cfg = get_config('tiny', gradient_checkpointing=True)
    default, reentrant = peft_model(cfg), peft_model(cfg)
    enable_checkpointing(reentrant.get_base_model(), reentrant=True)      # the benchmark's --checkpointing reentrant
    assert mlp_grad_modes(default, IDS) == [True, True]      # the MLP runs twice, the first time building the graph
    assert mlp_grad_modes(reentrant, IDS) == [False, True]   # reentrant: the first pass without autograd
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (default, reentrant)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])

def test_offload_wraps_the_forward_pass_alone(tmp_path):
    "Recomputation runs in the backward pass: a reentrant one inside the offload context would send every tensor it saves across the bus."
    from qlora_nb.data import build_datasets
    from qlora_nb.kbit import enable_checkpointing
    from qlora_nb.fast_path import OffloadActivations
    from qlora_nb.workflow import run_trainer
    cfg = get_config('tiny', micro_batch=4, grad_accum=1, max_steps=1, gradient_checkpointing=True, save_steps=100, eval_steps=100)
    tokenizer = load_tokenizer(cfg, verbose=False)
    model = peft_model(cfg)
    enable_checkpointing(model.get_base_model(), reentrant=True)   # the form whose recompute would be caught
    trainer = run_trainer(model, tokenizer, cfg, build_datasets(cfg, tokenizer), str(tmp_path))
    batches, collate = [], trainer.data_collator
    trainer.data_collator = lambda rows: batches.append(collate(rows)) or batches[-1]   # keep the step's batch
    trainer.offload = OffloadActivations(model, min_bytes=1)        # every saved tensor counts, even the tiny model's
    trainer.train()
    forward_only = OffloadActivations(model, min_bytes=1)
    model.train()                                                  # checkpointing runs in training mode only
    with forward_only: model(**{k: v.to(model.device) for k, v in batches[0].items()})
    extra = trainer.offload.saved - forward_only.saved   # the first batch is the one step's; evaluation saves nothing
    assert forward_only.saved > 0 and 0 <= extra < 64   # the Trainer's loss scaling saves a scalar; a recompute would add megabytes
