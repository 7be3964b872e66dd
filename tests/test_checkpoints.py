"""Checkpoint faults injected for real on the tiny model's Trainer runs: quarantine and rotation, stale checkpoints,
malformed manifests, the run record, and every refusal and note of `check_resume_compatible`."""
import json, pickle, shutil, warnings
from pathlib import Path
from types import SimpleNamespace
import pytest, torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from qlora_nb.config import get_config, to_dict
from qlora_nb.workflow import train
from qlora_nb.saving import base_identity
from qlora_nb.checkpoints import (MANIFEST, RUN_RECORD, checkpoints, verify_checkpoint, write_manifest, find_checkpoint,
                                  quarantine, quarantined, clean_quarantine, check_resume_compatible, checkpoint_to_resume,
                                  CheckpointKeeper)

def cfg_for(**kw): return get_config('tiny', **{'max_steps': 12, 'save_steps': 4, 'eval_steps': 1000, 'logging_steps': 1, **kw})
def names(folder): return [c.name for c in checkpoints(folder)]
def reseal(c): write_manifest(c, batch=json.loads((c/MANIFEST).read_text()).get('batch'))
def args_for(folder): return SimpleNamespace(output_dir=str(folder), per_device_train_batch_size=8, gradient_accumulation_steps=1)

def truncate(path, size=10):
    with open(path, 'r+b') as f: f.truncate(size)

@pytest.fixture(scope='module')
def base(tmp_path_factory):
    "One real run of 12 steps saving every 4, cut off after step 8: checkpoint-4 and checkpoint-8; with its trained model."
    out = tmp_path_factory.mktemp('base')/'run'
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 8: control.should_training_stop = True
    trainer = train(cfg_for(), str(out), before_training=lambda t: t.add_callback(Stop()))
    assert names(out) == ['checkpoint-4', 'checkpoint-8']
    return out, trainer.model

@pytest.fixture
def run(base, tmp_path):
    "A fresh copy of the base run, to break."
    shutil.copytree(base[0], tmp_path/'run')
    return tmp_path/'run'

# --- 1. quarantine and rotation ------------------------------------------------------------------

def test_rotation_after_a_quarantine_keeps_the_sound_checkpoints(run, base):
    truncate(run/'checkpoint-8'/'adapter_model.safetensors')
    assert checkpoint_to_resume(run, True) == run/'checkpoint-4'           # the look-up train makes: 8 is set aside
    assert checkpoint_to_resume(run, True) == run/'checkpoint-4'           # a second look-up neither renames it again nor counts it
    assert [p.name for p in quarantined(run)] == ['checkpoint-8.incomplete'] and names(run) == ['checkpoint-4']
    t = train(cfg_for(save_total_limit=3), str(run), resume=True)          # from checkpoint-4; writes 8 and 12 again
    assert t.state.global_step == 12
    assert names(run) == ['checkpoint-4', 'checkpoint-8', 'checkpoint-12']
    assert all(verify_checkpoint(c) is None for c in checkpoints(run))
    for f in (base[0]/'checkpoint-4').iterdir():          # the sound checkpoint is untouched, bit for bit
        assert (run/'checkpoint-4'/f.name).read_bytes() == f.read_bytes(), f.name
    assert quarantined(run) == []                         # a finished run cleans what it set aside

def test_clean_quarantine_removes_only_what_was_set_aside(run):
    truncate(run/'checkpoint-8'/'adapter_model.safetensors')
    find_checkpoint(run, verbose=False)
    assert clean_quarantine(run) == [run/'checkpoint-8.incomplete']
    assert quarantined(run) == [] and not (run/'checkpoint-8.incomplete').exists() and names(run) == ['checkpoint-4']

def test_keep_1_after_a_quarantine_keeps_the_checkpoint_just_written(run):
    truncate(run/'checkpoint-8'/'adapter_model.safetensors')
    train(cfg_for(save_total_limit=1), str(run), resume=True)
    assert names(run) == ['checkpoint-12'] and verify_checkpoint(run/'checkpoint-12') is None
    assert quarantined(run) == []

def test_a_taken_quarantine_name_gets_a_number(tmp_path):
    for step in (4, 8):
        c = tmp_path/f'checkpoint-{step}'; c.mkdir(); (c/'w').write_bytes(b'x' * 100); write_manifest(c)
    (tmp_path/'checkpoint-8.incomplete').mkdir()
    truncate(tmp_path/'checkpoint-8'/'w')
    assert find_checkpoint(tmp_path, verbose=False).name == 'checkpoint-4'
    assert [p.name for p in quarantined(tmp_path)] == ['checkpoint-8.incomplete', 'checkpoint-8.incomplete-2']
    c = tmp_path/'checkpoint-8'; c.mkdir()
    assert quarantine(c).name == 'checkpoint-8.incomplete-3'
    for odd in ('checkpoint-8x', 'checkpoint-08.bak', 'checkpoint--3', 'checkpoint-8.incomplete-1712345678.incomplete-1'):
        (tmp_path/odd).mkdir()
    assert names(tmp_path) == ['checkpoint-4']       # only checkpoint-<digits> is a checkpoint

def test_a_stale_checkpoint_from_an_earlier_run_is_left_alone(run, tmp_path):
    mirror = tmp_path/'drive'
    shutil.copytree(run/'checkpoint-8', run/'checkpoint-500')        # sealed, verified: left from a longer run
    mirror.mkdir(); shutil.copytree(run/'checkpoint-4', mirror/'checkpoint-4'); shutil.copytree(run/'checkpoint-8', mirror/'checkpoint-500')
    stale = (run/'checkpoint-500'/'adapter_model.safetensors').read_bytes()
    with pytest.warns(UserWarning, match=r'newer than step 12, from an earlier run: checkpoint-500') as said:
        train(cfg_for(save_total_limit=1, checkpoint_mirror=str(mirror)), str(run), resume=str(run/'checkpoint-8'))
    assert names(run) == ['checkpoint-12', 'checkpoint-500'] and names(mirror) == ['checkpoint-12', 'checkpoint-500']
    assert all(verify_checkpoint(c) is None for c in checkpoints(run) + checkpoints(mirror))
    assert (run/'checkpoint-500'/'adapter_model.safetensors').read_bytes() == stale
    said = [str(w.message) for w in said if 'from an earlier run' in str(w.message)]
    assert len([s for s in said if s.startswith(str(run))]) == 1 and len([s for s in said if s.startswith(str(mirror))]) == 1, said

def test_stale_checkpoints_are_warned_of_once_per_run(tmp_path):
    keeper = CheckpointKeeper(keep=1)
    c = tmp_path/'checkpoint-500'; c.mkdir(); (c/'w').write_bytes(b'old'); write_manifest(c)
    with pytest.warns(UserWarning) as said:
        for step in (4, 8, 12):
            c = tmp_path/f'checkpoint-{step}'; c.mkdir(); (c/'w').write_bytes(b'x' * step)
            keeper.on_save(args_for(tmp_path), SimpleNamespace(global_step=step), None)
    assert [str(w.message).split(':')[0] for w in said if 'earlier run' in str(w.message)] == [f'{tmp_path} holds checkpoints newer than step 4, from an earlier run']
    assert names(tmp_path) == ['checkpoint-12', 'checkpoint-500']

def test_a_checkpoint_that_does_not_verify_after_sealing_rotates_nothing(tmp_path, monkeypatch):
    import qlora_nb.checkpoints as ck
    for step in (4, 8):
        c = tmp_path/f'checkpoint-{step}'; c.mkdir(); (c/'w').write_bytes(b'x' * 100)
        if step == 4: write_manifest(c)
    real = ck.write_manifest
    def then_corrupt(folder, batch=None):        # the disk loses the end of a file right after the seal
        real(folder, batch); truncate(Path(folder)/'w')
    monkeypatch.setattr(ck, 'write_manifest', then_corrupt)
    with pytest.warns(UserWarning, match='checkpoint-8/w has 10 bytes.*older checkpoints are kept'):
        CheckpointKeeper(keep=1).on_save(args_for(tmp_path), SimpleNamespace(global_step=8), None)
    assert names(tmp_path) == ['checkpoint-4', 'checkpoint-8']

# --- 2. manifests of another shape -----------------------------------------------------------------

@pytest.mark.parametrize('manifest', ['[]', '"files"', '{"files": []}', '{"files": {"w": 100}}', '{"files": {"w": {"size": 100}}}',
                                      '{"files": {"w": {"size": "big", "sha256": "0"}}}', '{"files": {"w": null}}', '{}'])
def test_a_manifest_of_another_shape_is_a_problem_not_a_crash(tmp_path, manifest):
    for step in (4, 8):
        c = tmp_path/f'checkpoint-{step}'; c.mkdir(); (c/'w').write_bytes(b'x' * 100); write_manifest(c)
    (tmp_path/'checkpoint-8'/MANIFEST).write_text(manifest)
    assert 'not a manifest' in verify_checkpoint(tmp_path/'checkpoint-8')
    assert find_checkpoint(tmp_path, verbose=False).name == 'checkpoint-4'
    assert [p.name for p in quarantined(tmp_path)] == ['checkpoint-8.incomplete']

def test_resume_refuses_a_real_checkpoint_with_a_manifest_of_another_shape(run, base):
    (run/'checkpoint-8'/MANIFEST).write_text(json.dumps({'files': {'adapter_model.safetensors': 'sealed'}}))
    with pytest.raises(ValueError, match=r"checkpoint-8.*not a sealed, verified checkpoint .*not a manifest"):
        check_resume_compatible(run/'checkpoint-8', base[1])
    (run/'checkpoint-8'/MANIFEST).write_text(json.dumps({'files': {}}))          # verifies, but seals nothing
    with pytest.raises(ValueError, match=r"does not list trainer_state.json and adapter_config.json"):
        check_resume_compatible(run/'checkpoint-8', base[1])

# --- 3. the run record ---------------------------------------------------------------------------------

def test_the_run_record_is_sealed_with_the_checkpoint(base):
    out, model = base
    for c in checkpoints(out):
        record = json.loads((c/RUN_RECORD).read_text())
        assert record['config'] == json.loads(json.dumps(to_dict(cfg_for())))
        assert record['base'] == base_identity(model, cfg_for()) and record['base']['model'] == 'qlora_nb/tiny-llama'
        assert record['quantization'] == dict(quant_type='nf4', double_quant=True, compute_dtype='float32', quant_storage='uint8')
        assert RUN_RECORD in json.loads((c/MANIFEST).read_text())['files']

# --- 4. check_resume_compatible: refusals ----------------------------------------------------------

def test_a_sound_checkpoint_resumes_with_nothing_to_say(base):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert check_resume_compatible(base[0]/'checkpoint-8', base[1], cfg_for()) == []

def test_a_checkpoint_that_does_not_verify_is_refused(run, base):
    truncate(run/'checkpoint-8'/'adapter_model.safetensors')
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-8.*not a sealed, verified checkpoint.*has 10 bytes.*resume=True picks"):
        train(cfg_for(), str(run), resume=str(run/'checkpoint-8'))
    (run/'checkpoint-4'/'trainer_state.json').unlink()
    with pytest.raises(ValueError, match='checkpoint-4.*is not a training checkpoint: it lacks trainer_state.json'):
        check_resume_compatible(run/'checkpoint-4', base[1])

def test_a_broken_adapter_config_or_run_record_is_named(run, base):
    c = run/'checkpoint-8'
    (c/'adapter_config.json').write_text('{"r": 16, '); reseal(c)
    with pytest.raises(ValueError, match=r'checkpoint-8/adapter_config.json is not valid JSON'):
        check_resume_compatible(c, base[1])
    shutil.copy(run/'checkpoint-4'/'adapter_config.json', c/'adapter_config.json')
    for text, message in (('{"config": ', rf'checkpoint-8/{RUN_RECORD} is not valid JSON'),
                          ('[1, 2]', rf'{RUN_RECORD} does not hold a JSON object'),
                          ('{"config": 1}', rf'{RUN_RECORD} is not a run record'),
                          ('{"config": {}, "base": {"model": "x", "fingerprint": []}}', rf'{RUN_RECORD} is not a run record')):
        (c/RUN_RECORD).write_text(text); reseal(c)
        with pytest.raises(ValueError, match=message):
            check_resume_compatible(c, base[1])

class Trap:
    "A pickle that, if ever unpickled, creates a file."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (open, (self.marker, 'w'))

def test_pickled_weights_are_refused_and_never_unpickled(run, base, tmp_path):
    c, marker = run/'checkpoint-8', tmp_path/'unpickled'
    (c/'adapter_model.safetensors').unlink()
    (c/'adapter_model.bin').write_bytes(pickle.dumps(Trap(str(marker)))); reseal(c)
    with pytest.raises(ValueError, match=r'checkpoint-8.*holds adapter_model.bin, pickled weights, and pickles are never unpickled'):
        train(cfg_for(), str(run), resume=True)
    assert not marker.exists()
    c = run/'checkpoint-4'                  # next to the safetensors, any other pickled weights are refused too
    (c/'extra_weights.pt').write_bytes(pickle.dumps(Trap(str(marker)))); reseal(c)
    with pytest.raises(ValueError, match=r'holds extra_weights.pt, pickled weights'):
        check_resume_compatible(c, base[1])
    assert not marker.exists()

def test_missing_or_extra_adapter_tensors_are_refused(run, base):
    c = run/'checkpoint-8'
    tensors = load_file(c/'adapter_model.safetensors')
    dropped = sorted(k for k in tensors if 'lora_B' in k)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, c/'adapter_model.safetensors'); reseal(c)
    with pytest.raises(ValueError, match=rf"lacks 1 of the model's adapter tensors \['{dropped}'\] and holds 0"):
        check_resume_compatible(c, base[1])
    save_file({**tensors, 'base_model.model.extra.lora_A.weight': torch.zeros(2, 2)}, c/'adapter_model.safetensors'); reseal(c)
    with pytest.raises(ValueError, match=r"lacks 0 .* holds 1 the model does not have \['base_model.model.extra.lora_A.weight'\]"):
        check_resume_compatible(c, base[1])

def test_another_base_is_refused(run, base, tmp_path):
    from transformers import AutoModelForCausalLM
    from qlora_nb.models import tiny_model_path
    other = tmp_path/'other-tiny'
    shutil.copytree(tiny_model_path(), other)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.01)
    model.save_pretrained(other)
    with pytest.raises(ValueError, match=rf"the base model differs \(model: checkpoint 'qlora_nb/tiny-llama', now '{other}'\)"):
        train(cfg_for(model=str(other)), str(run), resume=True)
    c = run/'checkpoint-8'                                # the same id, but the record holds another shape
    record = json.loads((c/RUN_RECORD).read_text()); record['base']['fingerprint']['hidden_size'] = 256
    (c/RUN_RECORD).write_text(json.dumps(record)); reseal(c)
    with pytest.raises(ValueError, match=r'the base model differs \(hidden_size: checkpoint 256, now 128\)'):
        check_resume_compatible(c, base[1])

def test_other_4bit_settings_are_refused(run):
    with pytest.raises(ValueError, match=r"the 4-bit settings differ \(quant_type: checkpoint 'nf4', now 'fp4'\).*original quantization"):
        train(cfg_for(quant_type='fp4'), str(run), resume=True)

def test_another_lora_shape_is_refused(run):
    with pytest.raises(ValueError, match=r"the LoRA adapter changed \(lora_alpha: checkpoint 32, now 16"):
        train(cfg_for(alpha=16), str(run), resume=True)

# --- 4. check_resume_compatible: notes ---------------------------------------------------------------

def test_compatible_changes_resume_and_are_named_in_one_warning(run):
    with pytest.warns(UserWarning, match=r'settings changed since checkpoint-8 \(a resume allows it\)') as said:
        t = train(cfg_for(learning_rate=1e-3, dropout=0.1, warmup_ratio=0.1), str(run), resume=True)
    assert t.state.global_step == 12 and names(run) == ['checkpoint-8', 'checkpoint-12'] and verify_checkpoint(run/'checkpoint-12') is None
    [note] = t.resume_notes
    assert [str(w.message) for w in said if 'settings changed' in str(w.message)] == [note] and '\n' not in note
    for change in ('dropout: checkpoint 0.0, now 0.1', 'learning_rate: checkpoint 0.003, now 0.001', 'warmup_ratio: checkpoint 0.03, now 0.1'):
        assert change in note
    assert 'the Trainer keeps' not in note and 'not exact' not in note

def test_changed_save_steps_are_named_as_kept_by_the_trainer(base):
    with pytest.warns(UserWarning, match=r"save_steps: checkpoint 4, now 6; the Trainer keeps the checkpoint's save_steps"):
        check_resume_compatible(base[0]/'checkpoint-8', base[1], cfg_for(save_steps=6))

def test_missing_optimizer_state_warns_that_the_resume_is_not_exact(run, base):
    c = run/'checkpoint-8'
    (c/'optimizer.pt').unlink(); reseal(c)
    with pytest.warns(UserWarning, match=r'resume will not be exact: optimizer.pt missing from checkpoint-8'):
        t = train(cfg_for(), str(run), resume=True)
    assert t.state.global_step == 12 and [n[:10] for n in t.resume_notes] == ['not exact:']
    c = run/'checkpoint-12'
    (c/'rng_state.pth').unlink(); (c/'scheduler.pt').unlink(); reseal(c)
    with pytest.warns(UserWarning, match='resume will not be exact: scheduler.pt, rng_state.pth missing'):
        notes = check_resume_compatible(c, base[1])
    assert len(notes) == 1 and notes[0].startswith('not exact:')

def test_a_checkpoint_without_a_run_record_still_resumes(run, base):
    c = run/'checkpoint-8'
    (c/RUN_RECORD).unlink(); reseal(c)
    with pytest.warns(UserWarning, match=rf'checkpoint-8 has no {RUN_RECORD} .*not checked'):
        notes = check_resume_compatible(c, base[1], cfg_for(quant_type='fp4'))      # nothing to compare it with
    assert len(notes) == 1 and not notes[0].startswith('not exact:')
    with pytest.warns(UserWarning, match=rf'has no {RUN_RECORD}'):
        t = train(cfg_for(), str(run), resume=True)
    assert t.state.global_step == 12 and (run/'checkpoint-12'/RUN_RECORD).is_file()

def test_another_compute_dtype_is_a_note_not_a_refusal(base):
    "A checkpoint written computing in float32 (a CPU) resumes computing in bf16 (a larger GPU), as one from a T4 (fp16) would."
    from qlora_nb.models import load_tokenizer
    from qlora_nb.loading import load_model
    from qlora_nb.peft_model import create_peft_model
    cfg = cfg_for(compute_dtype='bfloat16')
    model = create_peft_model(load_model(cfg, load_tokenizer(cfg, verbose=False)), cfg)
    with pytest.warns(UserWarning, match="computes in another dtype"):
        notes = check_resume_compatible(base[0]/'checkpoint-8', model, cfg)
    assert any("compute_dtype: checkpoint 'float32', now 'bfloat16'" in n for n in notes), notes
