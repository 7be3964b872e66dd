"""Rows of the reliability table (tests/reliability.md) that no other file covers: 4-bit sanity (Q1), a moved run
folder (R10) and secrets in saved files (S2)."""
import shutil
from pathlib import Path
import pytest, torch

from qlora_nb.config import get_config
from qlora_nb.models import load_tokenizer
from qlora_nb.loading import load_model, quantized_layers
from qlora_nb.quantization import quantization_error
from qlora_nb.workflow import train, run_workflow
from qlora_nb.checkpoints import checkpoints, verify_checkpoint

@pytest.fixture
def rows(tmp_path) -> str:
    "A small local dataset: a run on it skips the 20,000 shipped rows and the exact-answer checks."
    path = tmp_path/'rows.jsonl'
    words = [''.join('abcdefghij'[int(d)] for d in f'{7 * i + 3:03d}') + 'xy'[i % 2] for i in range(32)]   # 32 distinct words
    path.write_text(''.join(f'{{"prompt": "Reverse: {w}\\n", "completion": "{w[::-1]}"}}\n' for w in words))
    return str(path)

def test_q1_nf4_error_bound_and_a_4bit_model_refuses_a_cast():
    "NF4 in blocks of 64 reconstructs a normal matrix within bitsandbytes' own tested bound, better than FP4; casting refuses."
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    nf4, fp4 = quantization_error(w, 'nf4', double_quant=False)['mean_abs_error'], quantization_error(w, 'fp4', double_quant=False)['mean_abs_error']
    assert nf4 < 0.0728 + 7 * 7.4e-5 and nf4 < fp4      # the bound of bitsandbytes' test for nf4 at blocksize 64
    cfg = get_config('tiny')
    model = load_model(cfg, load_tokenizer(cfg, verbose=False))
    assert quantized_layers(model)
    for cast in (model.half, model.float, lambda: model.to(torch.float16)):
        with pytest.raises(ValueError): cast()

def test_r10_a_run_folder_moved_elsewhere_resumes_and_finishes(tmp_path, rows):
    "Like a Drive path that changed between sessions: the checkpoints are read from where they are now."
    cfg = get_config('tiny', dataset=rows, max_steps=6, save_steps=2, eval_steps=1000, logging_steps=1, micro_batch=8)
    class Stop(Exception): pass
    def stop_at_4(trainer):
        from transformers import TrainerCallback
        class At4(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                if state.global_step == 4: raise Stop()
        trainer.add_callback(At4())
    with pytest.raises(Stop): train(cfg, str(tmp_path/'here'), before_training=stop_at_4)
    shutil.move(tmp_path/'here', tmp_path/'there')
    trainer = train(cfg, str(tmp_path/'there'), resume=True)
    assert trainer.state.global_step == 6
    assert [c.name for c in checkpoints(tmp_path/'there')] == ['checkpoint-4', 'checkpoint-6']
    assert all(verify_checkpoint(c) is None for c in checkpoints(tmp_path/'there'))

def test_s2_a_token_in_the_environment_reaches_no_saved_file(tmp_path, rows, monkeypatch):
    token = 'hf_qlorannbDummyTokenThatMustNeverBeSaved1234'
    monkeypatch.setenv('HF_TOKEN', token); monkeypatch.setenv('HUGGING_FACE_HUB_TOKEN', token)
    cfg = get_config('tiny', dataset=rows, max_steps=2, save_steps=2, eval_steps=1000, logging_steps=1, micro_batch=8)
    run_workflow(cfg, str(tmp_path/'run'), live=False)
    files = [p for p in (tmp_path/'run').rglob('*') if p.is_file()]
    assert len(files) > 10 and any(p.name == 'training_args.bin' for p in files)
    leaked = [str(p.relative_to(tmp_path)) for p in files if token.encode() in p.read_bytes()]
    assert not leaked, leaked

def batches_seen(trainer, seen: list):
    "Record the token ids of every micro-batch the trainer's collator makes."
    collate = trainer.data_collator
    def recording(rows):
        batch = collate(rows); seen.append(batch['input_ids'].tolist()); return batch
    trainer.data_collator = recording

@pytest.mark.parametrize('stop_at', [4, 6], ids=['at-an-epoch-boundary', 'mid-epoch'])
def test_r2_a_resume_with_accumulation_sees_the_same_batches_and_ends_bitwise_equal(tmp_path, rows, stop_at):
    "32 rows in steps of 4 x 2: an epoch is 4 steps. Stopped after the checkpoint of step `stop_at`, then resumed."
    from transformers import TrainerCallback
    cfg = get_config('tiny', dataset=rows, eval_fraction=0, max_steps=8, save_steps=2, eval_steps=1000, logging_steps=1,
                     micro_batch=4, grad_accum=2, dropout=0.1)
    whole_batches, split_batches = [], []
    whole = train(cfg, str(tmp_path/'whole'), before_training=lambda t: batches_seen(t, whole_batches))
    class Stop(Exception): pass
    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == stop_at: raise Stop()
    def stop(t): batches_seen(t, []); t.add_callback(StopAfterSave())
    with pytest.raises(Stop): train(cfg, str(tmp_path/'split'), before_training=stop)
    resumed = train(cfg, str(tmp_path/'split'), resume=True, before_training=lambda t: batches_seen(t, split_batches))
    assert resumed.state.global_step == 8
    assert split_batches == whole_batches[2 * stop_at:], 'the resumed run saw other batches than the uninterrupted one'
    lora = lambda t: {n: p.detach() for n, p in t.model.named_parameters() if p.requires_grad}
    a, b = lora(whole), lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
