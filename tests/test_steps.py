"""Steps 1-5 on the embedded tiny model: bad input is refused before any model loads, with a message that names
the problem; good input yields a 4-bit model with float32 LoRA adapters."""
import time
import pytest, torch
from qlora_nb.config import QLoRAConfig, ConfigError, get_config, update, load_config, save_config
from qlora_nb.core import choose_precision
from qlora_nb.quantization import bnb_config
from qlora_nb.models import load_tokenizer
from qlora_nb.loading import load_model, quantized_layers, footprint
from qlora_nb.lora import lora_config
from qlora_nb.peft_model import create_peft_model, check_trainable
from qlora_nb.kbit import is_checkpointing

@pytest.mark.parametrize('overrides, words', [
    (dict(r=0), 'r=0'), (dict(r=-8), 'r=-8'), (dict(alpha=0), 'alpha=0'), (dict(alpha=-1.0), 'alpha=-1.0'),
    (dict(dropout=1.0), 'dropout=1.0'), (dict(dropout=-0.1), 'dropout=-0.1'),
    (dict(quant_type='int4'), "quant_type='int4'"), (dict(compute_dtype='float8'), "compute_dtype='float8'"),
    (dict(micro_batch=0), 'micro_batch=0'), (dict(grad_accum=0), 'grad_accum=0'),
    (dict(learning_rate=0), 'learning_rate=0'), (dict(learning_rate=-1e-4), 'learning_rate=-0.0001'),
    (dict(target_modules=[]), 'target_modules=[]'),
])
def test_bad_values_are_refused_before_loading(overrides, words):
    t = time.time()
    with pytest.raises(ConfigError, match=words.replace('[', r'\[').replace(']', r'\]')):
        load_model(QLoRAConfig(**overrides))
    assert time.time() - t < 1, 'refused before any weights load'

def test_unknown_preset_and_key_name_the_problem():
    with pytest.raises(ConfigError, match="Unknown preset 'huge'.*'tiny'"): get_config('huge')
    with pytest.raises(ConfigError, match="'lora_rank'"): get_config('tiny', lora_rank=8)
    with pytest.raises(ConfigError, match="did you mean 'dropout'"): update(get_config('tiny'), droput=0.1)

def test_unknown_key_in_a_config_file(tmp_path):
    p = tmp_path/'run.yaml'
    p.write_text('r: 8\nlearnin_rate: 0.001\n')
    with pytest.raises(ConfigError, match="'learnin_rate' \\(did you mean 'learning_rate'\\?\\)"): load_config(p)

def test_bf16_on_a_gpu_without_it():
    with pytest.raises(ValueError, match='bfloat16 needs compute capability 8.0.*7.5'):
        choose_precision('bfloat16', cuda=True, capability=(7, 5))
    assert choose_precision('auto', cuda=True, capability=(7, 5)).fp16

def test_missing_model_path_is_refused_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match='No model folder at'): load_model(QLoRAConfig(model=str(tmp_path/'nope')))
    with pytest.raises(FileNotFoundError, match='no config.json'): load_model(QLoRAConfig(model=str(tmp_path)))

def test_target_module_that_matches_nothing():
    model = load_model(QLoRAConfig())
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer.*q_proj"):
        lora_config(QLoRAConfig(target_modules=['qproj', 'v_proj']), model)
    with pytest.raises(ValueError, match='match no linear layer'):
        create_peft_model(model, QLoRAConfig(target_modules=['attention']))

def test_the_tiny_model_is_real_4bit_and_deterministic():
    a, b = load_model(QLoRAConfig()), load_model(QLoRAConfig())
    assert len(quantized_layers(a)) == 28
    wa = a.model.layers[0].self_attn.q_proj.weight
    assert wa.dtype == torch.uint8 and torch.equal(wa, b.model.layers[0].self_attn.q_proj.weight)
    fp = footprint(a)
    assert fp['four_bit'] < fp['sixteen_bit'] / 3

def test_nf4_config_and_t4_precision():
    c = bnb_config(QLoRAConfig(quant_type='fp4', double_quant=False))
    assert c.bnb_4bit_quant_type == 'fp4' and not c.bnb_4bit_use_double_quant
    t4 = bnb_config(get_config('colab-t4'), choose_precision('auto', cuda=True, capability=(7, 5)))
    assert t4.bnb_4bit_compute_dtype == torch.float16

def test_peft_model_trains_only_float32_lora():
    cfg = QLoRAConfig(compute_dtype='bfloat16')
    model = create_peft_model(load_model(cfg), cfg)
    counts = check_trainable(model)
    assert 0 < counts['trainable'] < counts['total']
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16   # no float32 upcast of frozen weights
    assert not model.config.use_cache and is_checkpointing(model)

def test_tokenizer_pad_is_not_eos():
    tok = load_tokenizer(QLoRAConfig(), verbose=False)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id and tok.padding_side == 'right'

def test_config_round_trip(tmp_path):
    cfg = get_config('tiny', r=4, target_modules=['q_proj'], columns={'output': 'answer'})
    for name in ('a.yaml', 'a.json'): assert load_config(save_config(cfg, tmp_path/name)) == cfg
