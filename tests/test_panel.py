"""The hyperparameter panel, driven from code as a user would drive it by typing: no browser, no mocks."""
from dataclasses import fields, replace
import ipywidgets as widgets
import pytest
from qlora_nb.config import QLoRAConfig, ConfigError, problems, load_config
from qlora_nb.memory import fits, llama_config, run_estimate
from qlora_nb.panel import HyperparameterPanel

@pytest.fixture
def panel(): return HyperparameterPanel()

def test_every_config_field_has_a_widget(panel):
    assert set(panel.widgets) == {f.name for f in fields(QLoRAConfig)}
    assert isinstance(panel.widget, widgets.Widget) and hasattr(panel, '_ipython_display_')
    assert isinstance(panel.widgets['quant_type'], widgets.Dropdown) and isinstance(panel.widgets['gradient_checkpointing'], widgets.Checkbox)

def test_default_panel_is_valid_with_an_estimate(panel):
    assert panel.problems == [] and panel.config == QLoRAConfig()
    assert panel.estimate is not None and fits(panel.estimate, 'T4')
    assert 'No problems' in panel.problems_html.value and 'effective batch <b>16</b>' in panel.batch_html.value

def test_set_updates_config_and_estimate(panel):
    before = panel.estimate
    assert panel.set(micro_batch=8, grad_accum=2, max_length=128) is panel
    assert (panel.config.micro_batch, panel.config.grad_accum, panel.config.max_length) == (8, 2, 128)
    assert panel.widgets['micro_batch'].value == 8
    assert panel.estimate.tokens == 8 * 128 != before.tokens
    assert 'effective batch <b>16</b>' in panel.batch_html.value

def test_typing_in_a_widget_updates_like_set(panel):
    before = panel.estimate.lora_weights
    panel.widgets['r'].value = 64            # what the browser does on a keystroke
    assert panel.config.r == 64 and panel.estimate.lora_weights == 4 * before
    assert 'r=64' in panel.estimate.setting

@pytest.mark.parametrize('bad', [dict(r=0), dict(alpha=-1.0), dict(dropout=1.0), dict(quant_type='nf5'), dict(learning_rate=0.0),
                                 dict(micro_batch=0), dict(optimizer='adam'), dict(target_modules=''), dict(columns='instruction'),
                                 dict(model=''), dict(r=-4, grad_accum=0, lr_scheduler='cosin')])
def test_invalid_values_show_the_same_messages_as_problems(panel, bad):
    panel.set(**bad)
    expected = problems(QLoRAConfig(**{k: panel.values()[k] for k in panel.widgets}))
    assert panel.problems == expected and expected
    typed = {k: ([] if k == 'target_modules' else v) for k, v in bad.items()}
    assert panel.problems == problems(replace(QLoRAConfig(), **typed))
    for p in expected: assert p.replace('<', '&lt;').replace('>', '&gt;') in panel.problems_html.value
    assert panel.estimate is None
    with pytest.raises(ConfigError, match='cannot run'): panel.config

def test_values_a_widget_cannot_hold_are_refused_with_the_problems_message(panel):
    with pytest.raises(ConfigError, match=r"r=1.5 must be a whole number above 0"): panel.set(r=1.5)
    with pytest.raises(ConfigError, match=r"micro_batch=True must be a number above 0"): panel.set(micro_batch=True)
    assert panel.config.r == 16

def test_unknown_key_is_refused(panel):
    with pytest.raises(ConfigError, match="'lora_rank'"): panel.set(lora_rank=8)

def test_fixing_the_value_brings_the_estimate_back(panel):
    panel.set(r=0)
    assert panel.estimate is None
    panel.set(r=8)
    assert panel.problems == [] and panel.estimate is not None and panel.config.r == 8
    assert panel.widgets['quant_type'].options == ('nf4', 'fp4')

def test_model_config_passed_in_is_used_and_gpu_changes_the_verdict():
    p = HyperparameterPanel(QLoRAConfig(model='meta-llama/Meta-Llama-3-8B', micro_batch=8, grad_accum=2, max_length=2048),
                            model_config=llama_config('llama3-8b'), gpu='T4')
    assert p.estimate.logits == 12 * 128256 * 8 * 2048
    assert p.verdict().startswith('Does not fit the T4') and 'micro_batch=' in p.verdict()
    p.set(gpu='A100-40GB')
    assert p.verdict().startswith('Fits the A100-40GB') and '✓' in p.estimate_html.value

def test_the_estimate_is_counted_as_the_run_would_go_on_the_chosen_gpu():
    "A T4 (compute capability 7.5) runs no Liger kernels; 'auto' offloads 8 x 2048 tokens; the panel says both and counts them."
    cfg = QLoRAConfig(model='meta-llama/Meta-Llama-3-8B', micro_batch=8, grad_accum=2, max_length=2048)
    p = HyperparameterPanel(cfg, model_config=llama_config('llama3-8b'), gpu='T4')
    report = p.estimate_report()
    assert 'on the T4: fused kernels off (compute capability 7.5' in report and 'activation offload on (auto: 16,384 tokens' in report
    assert p.estimate.peak == run_estimate(llama_config('llama3-8b'), cfg).peak
    offloaded = p.estimate.activations
    p.set(offload_activations=False)
    assert 'activation offload off' in p.estimate_report() and p.estimate.activations > offloaded

def test_a_local_model_folder(tmp_path, panel):
    llama_config('llama2-7b').save_pretrained(tmp_path)
    panel.set(model=str(tmp_path), max_length=2048, micro_batch=2)
    assert panel.estimate is not None and panel.estimate.quantized_weights > 3 * 2**30

def test_hub_id_without_a_local_config_says_so(panel, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    panel.set(model='some-org/not-cached-model-7b')
    assert panel.problems == [] and panel.estimate is None
    assert 'config not available offline' in panel.estimate_note and 'not available offline' in panel.estimate_html.value

def test_to_yaml_round_trips_through_load_config(panel, tmp_path):
    panel.set(r=32, alpha=64.0, target_modules='q_proj, v_proj', columns={'instruction': 'question'}, revision='main', packing=True)
    path = panel.to_yaml(tmp_path/'run.yaml')
    back = load_config(path)
    assert back == panel.config
    assert back.target_modules == ['q_proj', 'v_proj'] and back.columns == {'instruction': 'question'} and back.revision == 'main'
    assert HyperparameterPanel(back).config == back

def test_to_yaml_refuses_an_invalid_form(panel, tmp_path):
    panel.set(dropout=1.5)
    with pytest.raises(ConfigError, match='dropout=1.5'): panel.to_yaml(tmp_path/'run.yaml')
    assert not (tmp_path/'run.yaml').exists()
