"""A small GPU and a runtime that disconnects: out-of-memory back-off and a verified checkpoint mirror, on the CPU."""
import json, shutil
from types import SimpleNamespace
from pathlib import Path
import pytest, torch

import qlora_nb.checkpoints as checkpoints_module
from qlora_nb.config import get_config, update
from qlora_nb.workflow import train
from qlora_nb.checkpoints import newest_checkpoint, checkpoints, verify_checkpoint, write_manifest, CheckpointMirror, MANIFEST
from qlora_nb.memory import GPUOutOfMemoryError

def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

def out_of_memory_above(rows: int, after_calls: int = 0):
    "A forward pre-hook that fails like CUDA does when a micro-batch has more than `rows` rows (after `after_calls` such calls)."
    seen = {'big': 0}
    def hook(module, args, kwargs):
        ids = kwargs.get('input_ids', args[0] if args else None)
        if ids is not None and ids.shape[0] > rows:
            seen['big'] += 1
            if seen['big'] > after_calls: raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (injected)')
    return hook

def inject(hook):
    return lambda trainer: trainer.model.register_forward_pre_hook(hook, with_kwargs=True)

CFG = dict(max_steps=6, save_steps=2, eval_steps=1000, logging_steps=1, micro_batch=8, grad_accum=2)

def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, capsys):
    cfg = get_config('tiny', **CFG)
    # reference: the split the back-off ends at, from the start, never out of memory
    whole = train(update(cfg, micro_batch=2, grad_accum=8), str(tmp_path/'whole'))
    # steps 1-3 run at 8 x 2 (checkpoint-2 is written); at step 4 micro-batches over 2 rows fail: 8 -> 4 -> 2
    trainer = train(cfg, str(tmp_path/'oom'), before_training=inject(out_of_memory_above(2, after_calls=6)))
    said = capsys.readouterr().out
    assert 'Out of GPU memory at micro_batch=8 x grad_accum=2: going on with micro_batch=4 x grad_accum=4' in said
    assert 'Out of GPU memory at micro_batch=4 x grad_accum=4: going on with micro_batch=2 x grad_accum=8' in said
    assert 'from checkpoint-2' in said
    assert trainer.state.global_step == 6 and trainer.qlora_config.micro_batch == 2 and trainer.qlora_config.effective_batch == 16
    assert trainer.args.per_device_train_batch_size == 2 and trainer.args.gradient_accumulation_steps == 8
    # The same examples make each optimizer step, so the adapter matches the run that used 2 x 8 throughout. Only the
    # order of float32 additions differs (8 rows at once vs 4 groups of 2, for steps 1-2), and Adam, which divides by
    # the gradient's own size, can turn that rounding into a visible fraction of a step on single coordinates whose
    # gradient is near zero (the largest one moved 6.6e-5, then 3.3e-4 once LoRA4bit summed in another order: chance).
    # So the adapter is compared as a whole: B starts at zero and holds all that training wrote; its relative L2
    # difference measured 1e-5 here, and 0.62 against a run whose effective batch is 2 x 4 instead of 2 x 8.
    a, b = lora_state(whole.model), lora_state(trainer.model)
    keys = [k for k in a if 'lora_B' in k]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm() / torch.cat([a[k].flatten() for k in keys]).norm()
    assert diff < 1e-3, diff
    manifest = json.loads((tmp_path/'oom'/'checkpoint-6'/MANIFEST).read_text())
    assert manifest['batch'] == {'micro_batch': 2, 'grad_accum': 8}
    assert all(verify_checkpoint(c) is None for c in checkpoints(tmp_path/'oom'))

def test_a_resumed_run_keeps_the_split_that_worked(tmp_path, capsys):
    cfg = get_config('tiny', **CFG)
    train(cfg, str(tmp_path/'run'), before_training=inject(out_of_memory_above(2)))
    capsys.readouterr()
    resumed = train(update(cfg, max_steps=8), str(tmp_path/'run'), resume=True)   # a fresh process would know only the config
    assert 'Resuming with micro_batch=2 x grad_accum=8' in capsys.readouterr().out
    assert resumed.args.per_device_train_batch_size == 2 and resumed.state.global_step == 8

def test_out_of_memory_at_micro_batch_1_says_what_to_change(tmp_path):
    cfg = get_config('tiny', max_steps=2, save_steps=1, eval_steps=1000, micro_batch=2, grad_accum=1)
    with pytest.raises(GPUOutOfMemoryError, match=r'micro_batch=1 .*no smaller split is left\. By the estimate this run needs [0-9.]+ GiB'):
        train(cfg, str(tmp_path/'run'), before_training=inject(out_of_memory_above(0)))

def test_other_errors_are_not_taken_for_out_of_memory(tmp_path):
    def broken(module, args, kwargs): raise RuntimeError('shape mismatch (a bug, not memory)')
    with pytest.raises(RuntimeError, match='a bug, not memory'):
        train(get_config('tiny', max_steps=2, eval_steps=1000), str(tmp_path/'run'), before_training=inject(broken))

def test_mirror_survives_a_disconnect_and_a_cut_off_copy(tmp_path):
    drive = tmp_path/'drive'
    cfg = get_config('tiny', max_steps=6, save_steps=2, eval_steps=1000, checkpoint_mirror=str(drive))
    whole = train(cfg, str(tmp_path/'run'))
    final = lora_state(whole.model)
    assert [c.name for c in checkpoints(drive)] == ['checkpoint-4', 'checkpoint-6']
    assert all(verify_checkpoint(c) is None for c in checkpoints(drive))
    assert not list(drive.glob('.*partial'))
    # the runtime disconnects: the local disk is gone, and Drive had not finished writing the newest copy
    shutil.rmtree(tmp_path/'run')
    with open(drive/'checkpoint-6'/'adapter_model.safetensors', 'r+b') as f: f.truncate(100)
    with pytest.raises(FileExistsError, match='drive.*already holds checkpoints'):
        train(cfg, str(tmp_path/'run'))                                 # never overwrite the mirror by accident
    assert newest_checkpoint(tmp_path/'run', drive, verbose=False) == drive/'checkpoint-4'   # the look-up train makes
    assert [p.name for p in drive.iterdir() if 'incomplete' in p.name] == ['checkpoint-6.incomplete'], 'the cut-off copy is set aside'
    resumed = train(cfg, str(tmp_path/'run'), resume=True)
    assert resumed.state.global_step == 6
    assert not [p for p in drive.iterdir() if 'incomplete' in p.name], 'a finished run cleans what it set aside'
    again = lora_state(resumed.model)
    assert all(torch.equal(final[k], again[k]) for k in final), 'resumed from checkpoint-4 of the mirror, the run ends where it did'

def test_a_copy_that_does_not_verify_never_replaces_the_older_ones(tmp_path, monkeypatch):
    local, drive = tmp_path/'run', tmp_path/'drive'
    mirror = CheckpointMirror(drive, keep=2)
    def save(step):
        c = local/f'checkpoint-{step}'; c.mkdir(parents=True)
        (c/'adapter_model.safetensors').write_bytes(bytes(range(256)) * 64); (c/'trainer_state.json').write_text('{}')
        write_manifest(c)
        mirror.on_save(SimpleNamespace(output_dir=str(local)), SimpleNamespace(global_step=step), None)
    save(2); save(4)
    real_copytree = shutil.copytree
    def cut_short(src, dst, **kw):   # Drive drops the end of a file
        real_copytree(src, dst, **kw)
        with open(Path(dst)/'adapter_model.safetensors', 'r+b') as f: f.truncate(1000)
    monkeypatch.setattr(checkpoints_module.shutil, 'copytree', cut_short)
    with pytest.warns(UserWarning, match='copy of checkpoint-6 .* did not verify .*has 1000 bytes.*keeps its older checkpoints'):
        save(6)
    assert [c.name for c in checkpoints(drive)] == ['checkpoint-2', 'checkpoint-4']
    assert all(verify_checkpoint(c) is None for c in checkpoints(drive)) and not list(drive.glob('.*partial'))
