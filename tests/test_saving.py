"""Step 7 on the embedded tiny model, with real files and the real 4-bit path: only LoRA tensors are saved, atomically;
they reload onto the same 4-bit base with the same logits; the wrong base, missing keys and corrupt files are errors
that name the problem; merged models load with plain transformers; adapters move both ways between qlora_nb and peft."""
import json, os, re, pickle, shutil, warnings
from pathlib import Path

import pytest, torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import qlora_nb.saving as saving
from qlora_nb.config import get_config, update
from qlora_nb.core import seed_everything
from qlora_nb.models import load_tokenizer, tiny_llama_config, tiny_tokenizer
from qlora_nb.loading import load_model, quantized_layers
from qlora_nb.peft_model import create_peft_model
from qlora_nb.saving import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECORD, AdapterError, WrongBaseError, save_adapter,
                             load_adapter, check_adapter, merge_adapter, lora_tensors, atomic_folder, dequantize_model)
from qlora_nb.evaluation import merge_report, compare_generations, Table

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "The tiny model's ops are too small to split: on a busy 2-core machine two threads wait on each other (8x slower here)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

TEXTS = ['olleh -> hello</s>', 'dlrow -> world</s>', 'tac -> cat</s>', 'esuoh -> house</s>']

def logits(model, batch):
    model.eval()
    with torch.no_grad(): return model(**batch).logits

def tree(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A 4-bit PEFT model given a few real AdamW steps, its adapter saved once, and its logits on a fixed batch."
    cfg = get_config('tiny')
    seed_everything(0)
    tokenizer = load_tokenizer(cfg, verbose=False)
    model = create_peft_model(load_model(cfg, tokenizer), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        ids = torch.randint(4, 260, (4, 24))
        model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    batch = tokenizer(TEXTS, return_tensors='pt', padding=True)
    path = save_adapter(model, tokenizer, tmp_path_factory.mktemp('run')/'adapter', cfg=cfg, metrics={'eval_loss': 4.2, 'steps': 4})
    return dict(cfg=cfg, tokenizer=tokenizer, model=model, batch=batch, logits=logits(model, batch), path=path)

def copy_adapter(trained, tmp_path, name='copy') -> Path:
    return Path(shutil.copytree(trained['path'], tmp_path/name))

def make_base(folder: Path, seed: int = 1, **changes) -> str:
    "A base model folder in the tiny model's format, with other weights and optionally another shape."
    torch.manual_seed(seed)
    c = tiny_llama_config()
    for k, v in changes.items(): setattr(c, k, v)
    LlamaForCausalLM(c).save_pretrained(folder); tiny_tokenizer().save_pretrained(folder)
    return str(folder)

# --- saving -----------------------------------------------------------------------------------------------------

def test_only_lora_tensors_are_saved_and_the_file_is_small(trained):
    path, model = trained['path'], trained['model']
    names = {p.name for p in path.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, RECORD, 'README.md', 'tokenizer.json', 'tokenizer_config.json'} <= names
    assert not names & {'model.safetensors', 'config.json', 'pytorch_model.bin', 'adapter_model.bin'}
    with safe_open(path/ADAPTER_WEIGHTS, 'pt') as f: keys = set(f.keys())
    assert keys and all('.lora_A.' in k or '.lora_B.' in k for k in keys)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n)
    assert sum(load_file(path/ADAPTER_WEIGHTS)[k].numel() for k in keys) == n_lora
    size = (path/ADAPTER_WEIGHTS).stat().st_size
    base_16bit = 2 * sum(p.numel() for n, p in load_model(trained['cfg'], quantize=False).named_parameters())
    assert size < n_lora * 4 + 64 * 1024 and size < base_16bit / 2

def test_records_base_versions_and_metrics(trained):
    path, cfg = trained['path'], trained['cfg']
    config = json.loads((path/ADAPTER_CONFIG).read_text())
    assert config['base_model_name_or_path'] == cfg.model and config['peft_type'] == 'LORA'
    record = json.loads((path/RECORD).read_text())
    assert record['base'] == dict(model=cfg.model, revision=None, fingerprint=dict(
        model_type='llama', hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=288))
    assert record['quantization']['bnb_4bit_quant_type'] == 'nf4' and record['config']['r'] == cfg.r
    assert record['metrics'] == {'eval_loss': 4.2, 'steps': 4}
    assert all(record['versions'][p] for p in ('torch', 'transformers', 'peft', 'bitsandbytes'))
    card = (path/'README.md').read_text()
    for needle in (cfg.model, 'nf4', 'eval_loss', '4.2', 'peft', record['versions']['bitsandbytes'], 'learning_rate'):
        assert needle in card, needle

def test_empty_or_broken_adapter_is_refused(trained, tmp_path):
    cfg, tokenizer = trained['cfg'], trained['tokenizer']
    base = load_model(cfg, tokenizer)
    with pytest.raises(AdapterError, match='not a PEFT model'): save_adapter(base, tokenizer, tmp_path/'a', cfg=cfg)
    prompt_tuned = get_peft_model(base, PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=4))
    with pytest.raises(AdapterError, match='no LoRA tensors'): save_adapter(prompt_tuned, tokenizer, tmp_path/'a', cfg=cfg)
    nan_model = create_peft_model(load_model(cfg, tokenizer), cfg)
    next(p for n, p in nan_model.named_parameters() if 'lora_B' in n).data[0, 0] = float('nan')
    with pytest.raises(AdapterError, match='NaN or Inf'): save_adapter(nan_model, tokenizer, tmp_path/'a', cfg=cfg)
    assert list(tmp_path.iterdir()) == []                         # nothing was written
    fresh = create_peft_model(load_model(cfg, tokenizer), cfg)    # B still zero: valid, but a warning
    with pytest.warns(UserWarning, match='lora_B matrix is zero'): lora_tensors(fresh)

def test_failed_save_keeps_the_old_adapter(trained, tmp_path, monkeypatch):
    path = copy_adapter(trained, tmp_path, 'adapter')
    before = tree(path)
    args = (trained['model'], trained['tokenizer'], path)
    with pytest.raises(TypeError, match='cannot be written to JSON'):
        save_adapter(*args, cfg=trained['cfg'], metrics={'loss': 1.0, 'figure': object()})
    monkeypatch.setattr(saving, 'model_card', lambda record: (_ for _ in ()).throw(OSError('No space left on device')))
    with pytest.raises(OSError, match='No space left'): save_adapter(*args, cfg=trained['cfg'])
    monkeypatch.undo()
    real_rename = os.rename
    def rename_fails_on_swap(src, dst):                            # the old folder is already aside when this fails
        if '.tmp-' in str(src): raise OSError('rename failed (simulated)')
        return real_rename(src, dst)
    monkeypatch.setattr(saving.os, 'rename', rename_fails_on_swap)
    with pytest.raises(OSError, match='simulated'): save_adapter(*args, cfg=trained['cfg'])
    monkeypatch.undo()
    assert tree(path) == before and [p.name for p in tmp_path.iterdir()] == ['adapter']   # intact, no leftovers
    save_adapter(*args, cfg=trained['cfg'], metrics={'loss': 0.5})                         # a good save replaces it
    assert json.loads((path/RECORD).read_text())['metrics'] == {'loss': 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ['adapter']

def test_atomic_folder_refuses_a_file(tmp_path):
    (tmp_path/'f').write_text('x')
    with pytest.raises(FileExistsError): atomic_folder(tmp_path/'f', lambda d: None)

# --- reloading --------------------------------------------------------------------------------------------------

def test_reload_on_the_4bit_base_gives_the_same_logits(trained):
    model, tokenizer = load_adapter(trained['path'], verbose=False)
    assert isinstance(model, PeftModel) and len(quantized_layers(model)) == 28
    assert torch.allclose(logits(model, trained['batch']), trained['logits'], atol=1e-5)
    saved = load_file(trained['path']/ADAPTER_WEIGHTS)
    now = lora_tensors(model)
    assert all(torch.equal(saved[k], now[k]) for k in saved)
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer(TEXTS)['input_ids'] == trained['tokenizer'](TEXTS)['input_ids']

def test_reload_on_the_16bit_base_differs_by_the_quantization_gap(trained):
    model, _ = load_adapter(trained['path'], quantize=False, verbose=False)
    assert not quantized_layers(model)
    reloaded = logits(model, trained['batch'])
    diff = (reloaded - trained['logits']).abs().max().item()
    similarity = torch.nn.functional.cosine_similarity(reloaded.flatten(), trained['logits'].flatten(), dim=0).item()
    assert diff > 1e-4 and similarity > 0.9   # a gap, but the same model

def test_base_of_another_shape_is_refused(trained, tmp_path, monkeypatch):
    narrow = make_base(tmp_path/'narrow', hidden_size=96, intermediate_size=288)
    with pytest.raises(WrongBaseError, match='trained on .qlora_nb/tiny-llama.*shape differs too: hidden_size 128 .* vs 96.*allow_other_base=True'):
        load_adapter(trained['path'], get_config('tiny', model=narrow))
    with pytest.warns(UserWarning, match='hidden_size 128'), pytest.raises(WrongBaseError, match=r'another shape.*\(16, 128\) in the file, \(16, 96\)'), \
         monkeypatch.context() as m:   # refused from the shapes alone, before any weights load
        m.setattr(saving, 'load_model', lambda *a, **k: pytest.fail('weights loaded before the shape check'))
        load_adapter(trained['path'], get_config('tiny', model=narrow), allow_other_base=True)

def test_narrower_and_shallower_base_is_named_a_shape_mismatch(trained, tmp_path):
    "Fewer layers also leave adapter tensors without a place; the shape difference is still what the error names."
    small = make_base(tmp_path/'small', hidden_size=96, intermediate_size=288, num_hidden_layers=2)
    with warnings.catch_warnings(), pytest.raises(WrongBaseError, match=r'another shape.*in the model; also, 28 adapter tensors have no place in this model\.'):
        warnings.simplefilter('ignore')
        load_adapter(trained['path'], get_config('tiny', model=small), allow_other_base=True)

def test_same_shape_other_id_or_revision_is_refused_unless_allowed(trained, tmp_path):
    other = make_base(tmp_path/'other', seed=1)
    with pytest.raises(WrongBaseError, match=f"trained on 'qlora_nb/tiny-llama'.*asked for is '{other}'"):
        load_adapter(trained['path'], get_config('tiny', model=other))
    with pytest.raises(WrongBaseError, match="revision 'v2'"):
        load_adapter(trained['path'], update(trained['cfg'], revision='v2'))
    with pytest.warns(UserWarning, match='allow_other_base=True'):
        model, _ = load_adapter(trained['path'], get_config('tiny', model=other), allow_other_base=True, verbose=False)
    assert model.config.qlora_nb_source['model'] == other
    assert not torch.allclose(logits(model, trained['batch']), trained['logits'], atol=1e-2)   # really another base
    same, _ = load_adapter(trained['path'], trained['cfg'], verbose=False)   # the right cfg passes
    assert torch.allclose(logits(same, trained['batch']), trained['logits'], atol=1e-5)

def test_fingerprint_catches_a_changed_base_under_the_same_name(trained, tmp_path):
    base = make_base(tmp_path/'base', seed=0)
    path = copy_adapter(trained, tmp_path)
    record = json.loads((path/RECORD).read_text())
    record['base'].update(model=base); record['base']['fingerprint']['num_hidden_layers'] = 8
    (path/RECORD).write_text(json.dumps(record))
    with pytest.raises(WrongBaseError, match='num_hidden_layers 8 .* vs 4'): load_adapter(path)

def test_missing_and_unexpected_adapter_keys_are_errors(trained, tmp_path, monkeypatch):
    weights = load_file(trained['path']/ADAPTER_WEIGHTS)
    dropped = sorted(k for k in weights if 'lora_B' in k)[5]
    path = copy_adapter(trained, tmp_path, 'missing')
    save_file({k: v for k, v in weights.items() if k != dropped}, path/ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match=f'{ADAPTER_WEIGHTS} does not match its record'): load_adapter(path, verbose=False)
    (path/RECORD).unlink()   # as a plain peft folder: the key check itself must catch it, before the base's weights load
    with monkeypatch.context() as m:
        m.setattr(saving, 'load_model', lambda *a, **k: pytest.fail('weights loaded before the key check'))
        with pytest.raises(AdapterError, match=f'lacks 1 adapter tensors the model needs: {dropped}'): load_adapter(path, verbose=False)
    base = load_model(trained['cfg'], trained['tokenizer'])   # attach_adapter on a loaded base checks too
    with pytest.raises(AdapterError, match=f'lacks 1 adapter tensors'): saving.attach_adapter(base, path)
    path = copy_adapter(trained, tmp_path, 'unexpected'); (path/RECORD).unlink()
    save_file({**weights, 'base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight': torch.zeros(2)}, path/ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match='no place for: .*lora_C'): load_adapter(path, verbose=False)

def test_corrupt_files_are_errors_that_name_the_file(trained, tmp_path):
    path = copy_adapter(trained, tmp_path, 'bad-config'); (path/RECORD).unlink()
    (path/ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(AdapterError, match=re.escape(f'{path/ADAPTER_CONFIG}')+' is not valid JSON'): load_adapter(path)
    path = copy_adapter(trained, tmp_path, 'bad-weights'); (path/RECORD).unlink()
    (path/ADAPTER_WEIGHTS).write_bytes((path/ADAPTER_WEIGHTS).read_bytes()[:1000])
    with pytest.raises(AdapterError, match=re.escape(f'{path/ADAPTER_WEIGHTS}')+' is not a readable safetensors file'): load_adapter(path)
    path = copy_adapter(trained, tmp_path, 'flipped')                # a flipped byte: only the recorded hash sees it
    data = bytearray((path/ADAPTER_WEIGHTS).read_bytes()); data[-5] ^= 0xFF; (path/ADAPTER_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=re.escape(f'{path/ADAPTER_WEIGHTS}')+' does not match its record'): check_adapter(path)
    path = copy_adapter(trained, tmp_path, 'bad-record'); (path/RECORD).write_text('not json')
    with pytest.raises(AdapterError, match=re.escape(f'{path/RECORD}')+' is not valid JSON'): load_adapter(path)
    path = copy_adapter(trained, tmp_path, 'gone'); (path/ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterError, match=re.escape(f'{path/ADAPTER_CONFIG}')+' is missing'): load_adapter(path)

class _Payload:
    def __reduce__(self): return (Path.touch, (Path(os.environ['QLORA_NB_MARKER']),))

def test_a_pickled_adapter_is_never_unpickled(trained, tmp_path, monkeypatch):
    marker = tmp_path/'pwned'
    monkeypatch.setenv('QLORA_NB_MARKER', str(marker))
    path = copy_adapter(trained, tmp_path, 'pickled'); (path/RECORD).unlink(); (path/ADAPTER_WEIGHTS).unlink()
    (path/'adapter_model.bin').write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(AdapterError, match='adapter_model.bin, a pickle'): load_adapter(path)
    assert not marker.exists()

# --- merging ----------------------------------------------------------------------------------------------------

def test_merged_models_load_with_plain_transformers(trained, tmp_path):
    batch = trained['batch']
    original = merge_adapter(trained['path'], tmp_path/'original', base='original', verbose=False)
    dequantized = merge_adapter(trained['path'], tmp_path/'dequantized', base='dequantized', verbose=False)
    for folder in (original, dequantized):
        assert (folder/'model.safetensors').is_file() and not (folder/ADAPTER_CONFIG).exists()
        assert 'quantization_config' not in json.loads((folder/'config.json').read_text())
    on_16bit, _ = load_adapter(trained['path'], quantize=False, verbose=False)
    plain = AutoModelForCausalLM.from_pretrained(original)
    assert not quantized_layers(plain) and next(plain.parameters()).dtype == torch.float32
    assert torch.allclose(logits(plain, batch), logits(on_16bit, batch), atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(dequantized)   # the dequantized NF4 base + adapter = the model as trained
    assert torch.allclose(logits(plain, batch), trained['logits'], atol=1e-4)
    with pytest.raises(ValueError, match="base='int4'"): merge_adapter(trained['path'], tmp_path/'x', base='int4')

def test_merge_report_compares_every_way_to_deploy(trained):
    rows = {r['model']: r for r in merge_report(trained['path'], TEXTS)}
    assert set(rows) == {'4-bit base + adapter (as trained)', '4-bit base, adapter off', '16-bit base + adapter',
                         'merged into dequantized NF4', 'merged into original 16-bit'}
    ref = rows['4-bit base + adapter (as trained)']
    assert ref['mean_kl'] == 0 and ref['top1_agreement'] == 1 and ref['max_abs_logit_diff'] == 0
    assert rows['merged into dequantized NF4']['mean_kl'] < 1e-6 and rows['merged into dequantized NF4']['top1_agreement'] == 1
    assert rows['merged into original 16-bit']['perplexity'] == pytest.approx(rows['16-bit base + adapter']['perplexity'], rel=1e-4)
    assert rows['4-bit base, adapter off']['mean_kl'] > rows['16-bit base + adapter']['mean_kl'] > 0
    assert all(r['perplexity'] > 1 for r in rows.values())
    assert '16-bit base + adapter' in repr(Table(list(rows.values()))) and '<table>' in Table(list(rows.values()))._repr_html_()

def test_dequantize_model_keeps_the_outputs(trained):
    model = load_model(trained['cfg'])
    ids = trained['batch']['input_ids']
    before = logits(model, {'input_ids': ids})
    dequantize_model(model)
    assert not quantized_layers(model) and not getattr(model.config, 'quantization_config', None)
    assert torch.allclose(logits(model, {'input_ids': ids}), before, atol=1e-4)

# --- before and after, and interoperability ---------------------------------------------------------------------

def test_compare_generations_switches_the_adapter_off_and_on(trained):
    model, tokenizer = load_adapter(trained['path'], verbose=False)
    torch.manual_seed(0)
    for n, p in model.named_parameters():                   # a strong adapter, so that outputs certainly change
        if 'lora_B' in n: p.data.normal_(0, 0.5)
    prompts = ['olleh -> ', 'tac -> ']
    rows = compare_generations(model, tokenizer, prompts, max_new_tokens=6)
    assert [r['prompt'] for r in rows] == prompts and any(r['base model'] != r['with adapter'] for r in rows)
    base = load_model(trained['cfg'], tokenizer)            # the 'base model' column is the base, really
    for r in rows:
        ids = tokenizer(r['prompt'], return_tensors='pt')
        out = base.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True) == r['base model']
    # evaluating without grad on the CPU must not repack the 4-bit weights into the inference layout (DESIGN.md)
    assert not any(getattr(m.weight.quant_state, 'packing_format_for_cpu', False)
                   for m in model.modules() if type(m).__name__ == 'Linear4bit' and hasattr(m.weight, 'quant_state'))
    assert '<table>' in Table(rows)._repr_html_()

def test_plain_peft_loads_a_qlora_nb_adapter(trained):
    base = load_model(trained['cfg'], trained['tokenizer'])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = PeftModel.from_pretrained(base, trained['path'])
    assert not [w for w in caught if 'missing adapter keys' in str(w.message)]
    assert torch.allclose(logits(model, trained['batch']), trained['logits'], atol=1e-5)

def test_qlora_nb_loads_a_plain_peft_adapter(trained, tmp_path, capsys):
    trained['model'].save_pretrained(tmp_path/'plain')
    assert not (tmp_path/'plain'/RECORD).exists()
    model, _ = load_adapter(tmp_path/'plain')
    assert 'no qlora_nb.json' in capsys.readouterr().out
    assert torch.allclose(logits(model, trained['batch']), trained['logits'], atol=1e-5)
    model, _ = load_adapter(tmp_path/'plain', trained['cfg'], verbose=False)     # cfg.model names the same folder
    assert torch.allclose(logits(model, trained['batch']), trained['logits'], atol=1e-5)
    with pytest.raises(WrongBaseError, match='from adapter_config.json'):
        load_adapter(tmp_path/'plain', get_config('tiny', model=make_base(tmp_path/'other')), verbose=False)
