"""Every architecture the project names, on a tiny random model of each: `qlora-nb train`, `generate`, `merge` and
`export` work, the merged model computes what the trained one does, llama.cpp runs the export, and an architecture
the memory estimate does not know costs the run nothing."""
import json
import pytest, torch

from qlora_nb.cli import main
from qlora_nb.config import get_config
from qlora_nb.workflow import train
from qlora_nb.models import TINY_ARCHITECTURES
from qlora_nb.saving import load_adapter
from qlora_nb.evaluation import text_logits, logit_agreement, generate_text, prompt_text
from qlora_nb.export import load_merged, check_gguf

SHORT = ['--set', 'max_steps=4', '--set', 'eval_steps=1000', '--set', 'save_steps=1000', '--set', 'logging_steps=1']
TEXTS = ['Reverse: hello\nolleh', 'Reverse: qlora\naroql']

@pytest.mark.parametrize('kind', TINY_ARCHITECTURES)
def test_train_generate_merge_and_export(kind, tmp_path, capsys):
    run = tmp_path/'run'
    assert main(['train', '--preset', 'tiny', '--set', f'model=qlora_nb/tiny-{kind}', *SHORT, '--output-dir', str(run)]) == 0
    metrics = json.loads((run/'metrics.json').read_text())
    assert metrics['steps'] == 4 and (run/'adapter'/'adapter_model.safetensors').is_file()
    if kind == 'gpt2':   # Conv1D layers and no intermediate_size: no estimate, and the run still writes its metrics
        assert metrics['predicted_gpu_peak_gib'] is None and 'No memory estimate' in capsys.readouterr().out
    else: assert metrics['predicted_gpu_peak_gib'] > 0
    capsys.readouterr()
    trained, tokenizer = load_adapter(run/'adapter', verbose=False)     # the adapter on its 4-bit base, as trained
    assert main(['generate', str(run), '--prompt', 'Reverse: abc\n', '--max-new-tokens', '6']) == 0
    assert capsys.readouterr().out == generate_text(trained, tokenizer, prompt_text('Reverse: abc\n', 'completion', tokenizer), 6) + '\n'

    assert main(['merge', str(run), str(tmp_path/'merged'), '--dtype', 'float32']) == 0
    merged, tokenizer = load_merged(tmp_path/'merged')
    gap = logit_agreement(text_logits(trained, tokenizer, TEXTS), text_logits(merged, tokenizer, TEXTS))
    assert gap['top1_agreement'] == 1.0 and gap['max_abs_diff'] < 1e-3, gap['max_abs_diff']   # the model as trained

    assert main(['export', str(tmp_path/'merged'), str(tmp_path/'model.gguf')]) == 0
    check = check_gguf(tmp_path/'model.gguf', merged, tokenizer)
    assert check['tokenization'] == 1.0 and check['decisive_agreement'] == 1.0 and check['max_abs_logit_diff'] < 0.1

@pytest.mark.parametrize('kind', TINY_ARCHITECTURES)
def test_the_fast_path_trains_each_architecture_as_peft_does(kind, tmp_path):
    "`speed_up`'s LoRA4bit, fused MLP and RMSNorm on this architecture: the same losses and adapter as peft's own path."
    losses, adapters, notes = {}, {}, None
    for fast in (False, True):
        cfg = get_config('tiny', model=f'qlora_nb/tiny-{kind}', fast_path=fast, max_steps=3, logging_steps=1,
                         eval_steps=1000, save_steps=1000, micro_batch=16)
        trainer = train(cfg, str(tmp_path/f'fast-{fast}'))
        losses[fast] = torch.tensor([h['loss'] for h in trainer.state.log_history if 'loss' in h])
        adapters[fast] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        if fast: notes = trainer.model.fast_path
    assert any(n.startswith('fast LoRA: on') and not n.startswith('fast LoRA: on, 0 ') for n in notes), notes
    assert len(losses[True]) == 3 and torch.allclose(losses[True], losses[False], rtol=1e-4), (losses, notes)
    # Adam moves each weight by about the learning rate a step whatever the gradient's size, so rounding-level gradient
    # differences show as up to ~1% of one step's move; a wrong gradient moves weights by whole steps
    for name, value in adapters[False].items(): assert torch.allclose(adapters[True][name], value, rtol=0, atol=0.05 * cfg.learning_rate), name

def test_building_a_tiny_model_leaves_the_random_state_alone(tmp_path, monkeypatch):
    "A first run builds the tiny model after seeding; the build must not change the LoRA init that follows, or a fresh machine's first run differs from every later one."
    from qlora_nb.models import tiny_model_path, tiny_random_model
    monkeypatch.setenv('QLORA_NB_CACHE', str(tmp_path))
    torch.manual_seed(123); before = torch.get_rng_state()
    first = tiny_model_path(); tiny_random_model('qwen2')
    assert torch.equal(torch.get_rng_state(), before) and (first/'model.safetensors').is_file()
