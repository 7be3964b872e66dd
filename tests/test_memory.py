"""The memory estimator: its arithmetic against hand-computed values, its behaviour as settings change, and its
accuracy against peaks measured on an H200."""
import math
from dataclasses import replace
import pytest
from qlora_nb.config import QLoRAConfig
from qlora_nb.models import tiny_llama_config
from qlora_nb.core import GiB
from qlora_nb.memory import (fit_micro_batch, GPUS, MemoryEstimate, ModelConfigUnavailable, check_against_measured, cheapest_fix,
                             estimate_memory, fits, fix_config, gpu_bytes, llama_config, lora_params, measured_peaks,
                             model_shape, plot_memory, quantized_bytes, resolve_model_config, run_estimate, smallest_gpu, weight_bytes)

LLAMA2, LLAMA3 = llama_config('llama2-7b'), llama_config('llama3-8b')
RUN = QLoRAConfig(micro_batch=2, max_length=2048, packing=True)

def linear_numels(shape):
    return [i * o for i, o in model_shape(shape).linears().values()]

def test_shapes_read_from_configs():
    s = model_shape(LLAMA3)
    assert (s.vocab, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim) == (128256, 4096, 14336, 32, 32, 8, 128)
    assert s.quantized_params == 6_979_321_856
    assert model_shape(tiny_llama_config()).hidden == 128

def test_4bit_weights_equal_the_hand_computed_bytes():
    n_layer = sum(linear_numels(LLAMA2))                   # every Llama-2 linear is a multiple of 64 elements
    no_dq = weight_bytes(model_shape(LLAMA2), QLoRAConfig(double_quant=False))[0]
    assert no_dq == 32 * (n_layer // 2 + 4 * n_layer // 64)  # packed nibbles + one float32 absmax per 64
    dq = weight_bytes(model_shape(LLAMA2), QLoRAConfig(double_quant=True))[0]
    assert dq == 32 * sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 for n in linear_numels(LLAMA2))
    assert quantized_bytes(4096 * 4096, double_quant=False) == 4096 * 4096 * 9 // 16

def test_double_quant_lowers_weight_bytes_to_about_4_127_bits():
    s = model_shape(LLAMA3)
    no_dq, dq = (weight_bytes(s, QLoRAConfig(double_quant=d))[0] for d in (False, True))
    assert dq < no_dq
    assert 8 * no_dq / s.quantized_params == pytest.approx(4.5, abs=1e-3)
    assert 8 * dq / s.quantized_params == pytest.approx(4.127, abs=1e-3)

def test_unquantized_weights_in_the_compute_dtype_unless_upcast():
    e, up = estimate_memory(LLAMA3, RUN), estimate_memory(LLAMA3, RUN, upcast_embeddings=True)
    assert e.other_weights == 2 * (2 * 128256 * 4096 + 4096 * 65)
    assert up.other_weights == 2 * e.other_weights

def test_lora_state_follows_rank_and_optimizer():
    n = lora_params(model_shape(LLAMA2), QLoRAConfig())
    assert n == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))
    e8 = estimate_memory(LLAMA2, replace_cfg(RUN, optimizer='paged_adamw_8bit'))
    e32 = estimate_memory(LLAMA2, replace_cfg(RUN, optimizer='adamw_torch'))
    assert (e8.lora_weights, e8.lora_grads, e8.optimizer_state) == (4 * n, 4 * n, 2 * n)
    assert e32.optimizer_state == 8 * n
    assert estimate_memory(LLAMA2, replace_cfg(RUN, r=64)).lora_weights == 4 * e8.lora_weights

def test_checkpointing_lowers_activations():
    on = estimate_memory(LLAMA2, replace_cfg(RUN, gradient_checkpointing=True))
    off = estimate_memory(LLAMA2, replace_cfg(RUN, gradient_checkpointing=False))
    assert on.activations * 10 < off.activations and on.peak < off.peak
    assert on.quantized_weights == off.quantized_weights

@pytest.mark.parametrize('ckpt', [True, False])
def test_doubling_the_micro_batch_doubles_activations_not_weights(ckpt):
    one = estimate_memory(LLAMA2, replace_cfg(RUN, micro_batch=2, gradient_checkpointing=ckpt))
    two = estimate_memory(LLAMA2, replace_cfg(RUN, micro_batch=4, gradient_checkpointing=ckpt))
    assert two.tokens == 2 * one.tokens
    assert 1.9 < two.activations / one.activations < 2.1
    for part in ('quantized_weights', 'other_weights', 'lora_weights', 'lora_grads', 'optimizer_state'):
        assert getattr(two, part) == getattr(one, part), part

def test_a_128k_vocabulary_makes_the_loss_dominate():
    e3, e2 = estimate_memory(LLAMA3, RUN), estimate_memory(LLAMA2, RUN)
    parts = {p: getattr(e3, p) for p in MemoryEstimate.PARTS}
    assert max(parts, key=parts.get) == 'logits' and e3.phase == 'the loss'
    assert e3.logits == 12 * 128256 * e3.tokens
    assert e3.logits == pytest.approx(e2.logits * 128256 / 32000)

def test_padding_repeats_grouped_kv_heads():
    packed = estimate_memory(LLAMA3, replace_cfg(RUN, gradient_checkpointing=False, packing=True))
    padded = estimate_memory(LLAMA3, replace_cfg(RUN, gradient_checkpointing=False, packing=False))
    assert padded.activations > packed.activations
    same = [estimate_memory(LLAMA2, replace_cfg(RUN, gradient_checkpointing=False, packing=p)) for p in (True, False)]
    assert same[1].activations - same[0].activations == 2 * 2048 ** 2   # no grouped heads in Llama-2: only the mask

def test_fewer_target_modules_keep_less():
    some = replace_cfg(RUN, target_modules=['q_proj', 'v_proj'], gradient_checkpointing=False)
    all_ = replace_cfg(RUN, gradient_checkpointing=False)
    assert estimate_memory(LLAMA2, some).activations < estimate_memory(LLAMA2, all_).activations
    with pytest.raises(ValueError, match='v_pro'): estimate_memory(LLAMA2, replace_cfg(RUN, target_modules=['v_pro']))

def test_peak_excludes_the_cuda_context_but_fits_includes_it():
    e = estimate_memory(LLAMA2, RUN)
    assert e.peak == sum(getattr(e, p) for p in MemoryEstimate.PARTS)
    assert e.required == e.peak + e.slack + e.cuda_context
    assert fits(e, e.required) and not fits(e, e.required - 1)
    assert 14 * GiB < gpu_bytes('T4') < 15.5 * GiB and list(GPUS) == ['T4', 'L4', 'A100-40GB', 'A100-80GB', 'H100-80GB', 'H200']
    with pytest.raises(KeyError, match='T4'): gpu_bytes('T5')

def test_reference_figures_within_ten_percent():
    rows = check_against_measured()
    reference = [r for r in rows if r['recipe'] == 'plain']
    assert {(r['shape'], r['micro_batch'], r['gradient_checkpointing']) for r in reference} >= {
        ('llama2-7b', 2, True), ('llama2-7b', 2, False), ('llama3-8b', 2, True), ('llama3-8b', 8, True)}
    for r in reference: assert abs(r['error']) <= 0.10, r
    for r in rows:
        if r['recipe'] != 'fast': assert abs(r['error']) <= 0.05, r   # every run of peft's module chain, this project's included

def test_fast_path_estimates_stay_just_above_what_ran():
    "The eight fast-path peaks (Liger, LoRA4bit, dropout 0; offload off and on): never under by more than 2%, over by at most 10%."
    fast = [r for r in check_against_measured() if r['recipe'] == 'fast']
    assert len(fast) == 8 and {r['offload'] for r in fast} == {True, False}
    for r in fast: assert -0.02 <= r['error'] <= 0.10, r

def test_fused_kernels_drop_the_logits_and_offload_the_checkpoints():
    cfg = QLoRAConfig(micro_batch=8, max_length=2048, dropout=0.0, packing=True, compute_dtype='bfloat16')
    plain, fused = estimate_memory(LLAMA3, cfg), estimate_memory(LLAMA3, cfg, fused_kernels=True)
    assert plain.logits > 20 * GiB and fused.logits < 0.2 * GiB                  # 12 B x 128,256 per token, against 2 x 2 x 4,096
    both = estimate_memory(LLAMA3, cfg, fused_kernels=True, offload=True)
    checkpoint = 2 * 4096 * 8 * 2048                                            # one layer's bf16 input
    assert fused.activations - both.activations == (32 - 2) * checkpoint       # all but the two layers in flight
    assert estimate_memory(LLAMA3, replace(cfg, gradient_checkpointing=False), offload=True).activations == \
           estimate_memory(LLAMA3, replace(cfg, gradient_checkpointing=False)).activations   # offload moves checkpoints only

def test_fit_micro_batch_counts_the_fast_path():
    "Llama-3-8B at 2,048 tokens on an A100-40GB: the fused loss (and auto offload) let the whole batch of 16 fit in one micro-batch."
    cfg = QLoRAConfig(micro_batch=1, grad_accum=16, max_length=2048, dropout=0.0, packing=True, compute_dtype='bfloat16')
    plain, fast = fit_micro_batch(LLAMA3, cfg, 'A100-40GB'), fit_micro_batch(LLAMA3, cfg, 'A100-40GB', fused_kernels=True)
    assert plain.micro_batch < fast.micro_batch and fast.effective_batch == plain.effective_batch == 16

def test_run_estimate_counts_offload_where_training_turns_it_on():
    "'auto' offloads from 4,096 tokens per micro-batch (on a GPU, with checkpointing): the estimate of the run follows."
    cfg = QLoRAConfig(micro_batch=8, max_length=2048)
    assert run_estimate(LLAMA3, cfg).peak == estimate_memory(LLAMA3, cfg, offload=True).peak < estimate_memory(LLAMA3, cfg).peak
    small = replace(cfg, micro_batch=1)                                          # 2,048 tokens: 'auto' leaves offload off
    assert run_estimate(LLAMA3, small).peak == estimate_memory(LLAMA3, small).peak
    assert run_estimate(LLAMA3, replace(cfg, offload_activations=False)).peak == estimate_memory(LLAMA3, cfg).peak
    assert run_estimate(LLAMA3, cfg, fused_kernels=True).peak == estimate_memory(LLAMA3, cfg, fused_kernels=True, offload=True).peak

def test_cheapest_fix_counts_offload_and_fused_kernels():
    "Llama-3-8B at 2,048 tokens on an L4 (22 GiB): micro-batch 4 fits once 'auto' offload is counted, 8 once Liger's loss is."
    four, eight = QLoRAConfig(micro_batch=4, max_length=2048), QLoRAConfig(micro_batch=8, max_length=2048)
    assert not fits(estimate_memory(LLAMA3, four), 'L4') and fix_config(LLAMA3, four, 'L4') == four
    assert not fits(run_estimate(LLAMA3, eight), 'L4') and fix_config(LLAMA3, eight, 'L4').micro_batch < 8
    assert fix_config(LLAMA3, eight, 'L4', fused_kernels=True) == eight
    assert cheapest_fix(LLAMA3, eight, 'L4', fused_kernels=True).startswith('It already fits')

def test_measured_figures_file_has_the_documented_fields():
    for row in measured_peaks():
        assert {'shape', 'micro_batch', 'seq', 'gradient_checkpointing', 'upcast_embeddings', 'measured_peak_gib', 'source'} <= set(row)

@pytest.mark.parametrize('shape, cfg, gpu', [
    (LLAMA2, QLoRAConfig(micro_batch=8, grad_accum=4, max_length=2048, gradient_checkpointing=False), 'A100-40GB'),
    (LLAMA2, QLoRAConfig(micro_batch=8, grad_accum=4, max_length=2048, gradient_checkpointing=False), 'T4'),
    (LLAMA3, QLoRAConfig(micro_batch=8, grad_accum=2, max_length=4096), 'T4'),
    (LLAMA3, QLoRAConfig(micro_batch=1, max_length=16384, optimizer='adamw_torch'), 'L4'),
])
def test_cheapest_fix_names_a_change_that_fits(shape, cfg, gpu):
    assert not fits(run_estimate(shape, cfg), gpu)
    fixed = fix_config(shape, cfg, gpu)
    assert fixed is not None and fits(run_estimate(shape, fixed), gpu)
    text = cheapest_fix(shape, cfg, gpu)
    assert text.startswith(f'To fit the {gpu}')
    if fixed.micro_batch != cfg.micro_batch: assert f'micro_batch={fixed.micro_batch}' in text
    if fixed.max_length != cfg.max_length: assert f'max_length to {fixed.max_length}' in text
    if fixed.max_length == cfg.max_length and fixed.r == cfg.r: assert fixed.effective_batch == cfg.effective_batch

def test_cheapest_fix_tries_checkpointing_first():
    cfg = QLoRAConfig(micro_batch=4, max_length=2048, gradient_checkpointing=False)
    assert fix_config(LLAMA2, cfg, 'A100-40GB') == replace_cfg(cfg, gradient_checkpointing=True)
    assert cheapest_fix(LLAMA2, cfg, 'A100-40GB').startswith('To fit the A100-40GB (39.4 GiB): turn gradient checkpointing on.')

def test_cheapest_fix_when_it_fits_or_nothing_does():
    assert cheapest_fix(LLAMA2, QLoRAConfig(micro_batch=1, max_length=512), 'H200').startswith('It already fits')
    assert fix_config(LLAMA3, RUN, 2 * GiB) is None
    assert 'No setting change fits' in cheapest_fix(LLAMA3, RUN, 2 * GiB)
    assert smallest_gpu(estimate_memory(LLAMA2, RUN)) == 'T4'

def test_the_embedded_tiny_model():
    e = estimate_memory(cfg=QLoRAConfig())           # found from cfg.model alone
    assert e.model == 'qlora_nb/tiny-llama' and e.peak == estimate_memory(tiny_llama_config(), QLoRAConfig()).peak
    assert 0 < e.peak < 64 * 2**20 and fits(e, 'T4')

def test_config_from_a_local_folder(tmp_path):
    LLAMA3.save_pretrained(tmp_path)
    assert estimate_memory(str(tmp_path), RUN).peak == estimate_memory(LLAMA3, RUN).peak

def test_a_hub_id_that_is_not_cached_is_reported_not_downloaded(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(ModelConfigUnavailable, match='not available offline'):
        resolve_model_config('some-org/not-cached-model-7b', offline=True)

def test_float32_compute_doubles_the_unquantized_weights():
    e16, e32 = estimate_memory(LLAMA2, RUN), estimate_memory(LLAMA2, replace_cfg(RUN, compute_dtype='float32'))
    assert e32.other_weights == 2 * e16.other_weights and e32.activations > e16.activations

def test_plot_memory_draws_bars_against_gpus():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plot_memory({'a': estimate_memory(LLAMA2, RUN), 'b': estimate_memory(LLAMA3, RUN)})
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 10 and any('fits' in t.get_text() for t in ax.texts)
    plt.close(fig)

def test_readable_table():
    text = str(estimate_memory(LLAMA3, RUN))
    for word in ('quantized weights', 'logits', 'peak allocated', 'CUDA context', 'required on the GPU', 'GiB'): assert word in text

def replace_cfg(cfg, **kw):
    from dataclasses import replace
    return replace(cfg, **kw)
