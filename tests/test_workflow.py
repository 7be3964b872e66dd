"""The guarded entry to training: a used folder is refused before anything loads or is written, out-of-memory errors
outside the training steps never cost a finished run, and a stop says what it left on disk."""
import json, re
from pathlib import Path
import pytest, torch

import qlora_nb.workflow as workflow
from qlora_nb.core import sha256_file
from qlora_nb.config import get_config
from qlora_nb.models import load_tokenizer, load_model_config
from qlora_nb.data import build_datasets
from qlora_nb.loading import load_model
from qlora_nb.peft_model import create_peft_model
from qlora_nb.training import make_trainer, NonFiniteError
from qlora_nb.cli import main

SHORT = ['--set', 'max_steps=4', '--set', 'save_steps=2', '--set', 'eval_steps=1000', '--set', 'logging_steps=1']

def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob('*')) if p.is_file()}

def test_a_rerun_is_refused_before_data_or_model_load_and_before_anything_is_written(tmp_path, monkeypatch, capsys):
    out = tmp_path/'run'
    assert main(['train', '--preset', 'tiny', *SHORT, '--output-dir', str(out)]) == 0
    before = hashes(out)
    def must_not_run(*args, **kwargs): raise AssertionError('the data was loaded before the used folder was refused')
    monkeypatch.setattr(workflow, 'build_datasets', must_not_run)
    monkeypatch.setattr(workflow, 'load_tokenizer', must_not_run)
    assert main(['train', '--preset', 'tiny', *SHORT, '--set', 'r=4', '--output-dir', str(out)]) == 2
    assert 'already holds checkpoints' in capsys.readouterr().err
    assert hashes(out) == before                     # config.yaml still says r: 16, beside the r=16 adapter
    assert 'r: 16' in (out/'config.yaml').read_text()

def test_a_finished_run_without_checkpoints_is_refused_too(tmp_path):
    out = tmp_path/'run'; (out/'adapter').mkdir(parents=True)
    with pytest.raises(FileExistsError, match=re.escape("already holds a finished run (adapter)")):
        workflow.refuse_used_folder(out)
    workflow.refuse_used_folder(out, resume=True)    # resuming on purpose is allowed

@pytest.fixture(scope='module')
def tiny():
    cfg = get_config('tiny', fast_path=False, max_steps=4, save_steps=2, eval_steps=2, logging_steps=1, micro_batch=16)
    tokenizer = load_tokenizer(cfg, verbose=False)
    return cfg, tokenizer, build_datasets(cfg, tokenizer, verbose=False)

def test_the_trainer_itself_refuses_a_used_output_dir(tmp_path, tiny):
    cfg, tokenizer, data = tiny
    old = tmp_path/'checkpoint-2'; old.mkdir(); (old/'adapter_model.safetensors').write_bytes(b'an earlier run')
    trainer = make_trainer(create_peft_model(load_model(cfg, tokenizer), cfg), tokenizer, cfg, data, str(tmp_path))
    with pytest.raises(FileExistsError, match='already holds checkpoints: choose a new output_dir, or resume'):
        trainer.train()
    assert (old/'adapter_model.safetensors').read_bytes() == b'an earlier run' and trainer.state.global_step == 0

def out_of_memory_in_evaluation(model, above: int):
    "A forward pre-hook that fails like CUDA for evaluation batches of more than `above` rows (training batches pass)."
    def hook(module, args, kwargs):
        if not module.training and kwargs['input_ids'].shape[0] > above:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (injected)')
    return model.register_forward_pre_hook(hook, with_kwargs=True)

def test_evaluation_out_of_memory_halves_the_eval_batch_and_gives_the_same_loss(tmp_path, tiny, capsys):
    cfg, tokenizer, data = tiny
    model = create_peft_model(load_model(cfg, tokenizer), cfg)
    reference = make_trainer(model, tokenizer, cfg, data, str(tmp_path/'a'))
    reference.args.per_device_eval_batch_size = 4
    expected = reference.evaluate()['eval_loss']
    trainer = make_trainer(model, tokenizer, cfg, data, str(tmp_path/'b'))    # eval batch 16: out of memory above 4
    hook = out_of_memory_in_evaluation(model, above=4)
    got = trainer.evaluate()['eval_loss']
    hook.remove()
    assert trainer.args.per_device_eval_batch_size == 4 and got == expected
    assert 'evaluating again in batches of 8' in capsys.readouterr().out
    hook = out_of_memory_in_evaluation(model, above=0)       # not even one row fits: an error that is not an out-of-memory one
    with pytest.raises(RuntimeError, match='even at one example per batch') as caught:
        trainer.evaluate()
    hook.remove()
    assert not isinstance(caught.value, torch.cuda.OutOfMemoryError)

def test_out_of_memory_in_the_periodic_evaluation_leaves_the_training_split_alone(tmp_path, tiny):
    cfg, tokenizer, data = tiny
    seen = []
    def before_training(trainer):
        out_of_memory_in_evaluation(trainer.model, above=2)
        trainer.add_callback(type('Evals', (__import__('transformers').TrainerCallback,), {
            'on_evaluate': lambda self, args, state, control, **kw: seen.append(args.per_device_eval_batch_size)})())
    trainer = workflow.train(cfg, str(tmp_path/'run'), tokenizer=tokenizer, data=data, before_training=before_training)
    assert trainer.state.global_step == 4 and seen == [2, 2]                       # both evaluations ran, in batches of 2
    assert (trainer.qlora_config.micro_batch, trainer.qlora_config.grad_accum) == (cfg.micro_batch, cfg.grad_accum)

def test_a_failing_final_evaluation_keeps_the_adapter_and_metrics(tmp_path, monkeypatch):
    calls = []
    def accuracy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2: raise torch.cuda.OutOfMemoryError('CUDA out of memory. (injected in the final evaluation)')
        return 0.0
    monkeypatch.setattr(workflow, 'answer_accuracy', accuracy)
    cfg = get_config('tiny', max_steps=4, save_steps=2, eval_steps=1000, logging_steps=1)
    with pytest.raises(torch.cuda.OutOfMemoryError, match='final evaluation'):
        workflow.run_workflow(cfg, str(tmp_path/'run'), live=False)
    metrics = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert metrics['steps'] == 4 and metrics['final_evaluation'] is False and 'eval_loss_before' in metrics
    assert (tmp_path/'run'/'adapter'/'adapter_model.safetensors').is_file() and (tmp_path/'run'/'training.png').is_file()

@pytest.mark.parametrize('at_step, note', [(1, 'no checkpoint was written yet'), (3, 'the last checkpoint, checkpoint-2, is intact')])
def test_a_nan_stop_says_what_is_on_disk(tmp_path, tiny, at_step, note):
    cfg, tokenizer, data = tiny
    model = create_peft_model(load_model(cfg, tokenizer), cfg)
    trainer = make_trainer(model, tokenizer, cfg, data, str(tmp_path))
    poison = lambda module, inputs, output: output * float('nan') if trainer.state.global_step == at_step - 1 else output
    model.base_model.model.lm_head.register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match=f'at step {at_step}: training stopped before the optimizer step; {re.escape(note)}'):
        trainer.train()

def test_a_model_that_asks_for_its_own_code_is_refused_without_a_prompt(tmp_path):
    "transformers would ask 'Do you wish to run the custom code? [y/N]' on a terminal; with trust_remote_code=False it refuses."
    folder = tmp_path/'custom'; folder.mkdir()
    (folder/'config.json').write_text(json.dumps({'model_type': 'my-custom', 'auto_map': {'AutoConfig': 'configuration_my.MyConfig'}}))
    (folder/'configuration_my.py').write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises((ValueError, FileNotFoundError), match='trust_remote_code'):
        load_model_config(get_config('tiny', model=str(folder)))

def test_a_resume_missing_the_optimizer_state_is_flagged_in_the_metrics(tmp_path):
    "The files an exact resume needs: without optimizer.pt the run goes on, warns, and metrics.json says it was not exact."
    from qlora_nb.checkpoints import write_manifest, MANIFEST
    rows = tmp_path/'rows.jsonl'
    rows.write_text(''.join(f'{{"prompt": "Reverse: {w}\\n", "completion": "{w[::-1]}"}}\n' for w in ('abcd', 'hello', 'token', 'words') * 8))
    cfg = get_config('tiny', dataset=str(rows), max_steps=4, save_steps=2, eval_steps=1000, logging_steps=1, micro_batch=8)
    stop = lambda t: t.add_callback(type('Stop', (__import__('transformers').TrainerCallback,), {
        'on_step_end': lambda self, args, state, control, **kw: setattr(control, 'should_training_stop', state.global_step == 2)})())
    workflow.train(cfg, str(tmp_path/'run'/'checkpoints'), before_training=stop)      # a run cut off after checkpoint-2
    c = tmp_path/'run'/'checkpoints'/'checkpoint-2'
    (c/'optimizer.pt').unlink(); write_manifest(c, batch=json.loads((c/MANIFEST).read_text())['batch'])
    with pytest.warns(UserWarning, match='resume will not be exact: optimizer.pt missing'):
        metrics = workflow.run_workflow(cfg, str(tmp_path/'run'), resume=True, live=False)
    saved = json.loads((tmp_path/'run'/'metrics.json').read_text())
    assert metrics['steps'] == saved['steps'] == 4 and saved['resume_exact'] is False
    assert any(n.startswith('not exact:') for n in saved['resume_notes'])
