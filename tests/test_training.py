"""Step 6 on the embedded default: the main job learns, a NaN stops it, checkpoints are sealed and resume exactly."""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

from qlora_nb.config import get_config
from qlora_nb.workflow import train
from qlora_nb.training import NonFiniteError
from qlora_nb.checkpoints import find_checkpoint, verify_checkpoint, checkpoints, check_resume_compatible, MANIFEST

from conftest import ENV

def test_main_job_learns_the_task(main_job):
    "The command line's main job: held-out loss halves, and held-out answers go from under 10% to at least 80% right."
    out, done = main_job
    m = json.loads((out/'metrics.json').read_text())
    print({k: m[k] for k in ('eval_loss_before', 'eval_loss_after', 'accuracy_before', 'accuracy_after', 'wall_seconds')})
    assert m['eval_loss_after'] <= 0.5 * m['eval_loss_before']
    assert m['accuracy_before'] < 0.10
    assert m['accuracy_after'] >= 0.80
    assert (out/'adapter'/'adapter_model.safetensors').is_file() and (out/'training.png').stat().st_size > 10_000
    for step in ('data: ', 'steps 1-5, model: ', 'step 6, trained ', 'step 7, adapter saved to ', 'wrote '): assert step in done.stdout

RUN = textwrap.dedent('''
    import os, sys
    from transformers import TrainerCallback
    from safetensors.torch import save_file
    from qlora_nb.config import get_config
    from qlora_nb.workflow import train
    out, kill_at, resume, r = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1', int(sys.argv[4])
    cfg = get_config('tiny', max_steps=12, save_steps=4, eval_steps=1000, logging_steps=2, micro_batch=8, dropout=0.1, r=r)
    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == kill_at: os._exit(17)   # like a SIGKILL: no cleanup runs
    trainer = train(cfg, out, resume=resume, before_training=lambda t: t.add_callback(Kill()))
    save_file({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}, out + '/final.safetensors')
''')

def run(out, kill_at=0, resume=False, r=16):
    return subprocess.run([sys.executable, '-c', RUN, str(out), str(kill_at), '1' if resume else '0', str(r)],
                          env=ENV, capture_output=True, text=True, timeout=600)

def test_resume_after_a_kill_is_bitwise_exact(tmp_path):
    whole = run(tmp_path/'whole'); assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(tmp_path/'split', kill_at=8); assert killed.returncode == 17, killed.stderr[-3000:]
    assert [c.name for c in checkpoints(tmp_path/'split')] == ['checkpoint-4', 'checkpoint-8']
    # the process died inside on_save of step 8, after the seal: checkpoint 8 is complete
    assert find_checkpoint(tmp_path/'split').name == 'checkpoint-8'
    resumed = run(tmp_path/'split', resume=True); assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(tmp_path/'whole'/'final.safetensors'), load_file(tmp_path/'split'/'final.safetensors')
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed adapter differs from the uninterrupted one'
    state = lambda p: json.loads((p/'checkpoint-12'/'trainer_state.json').read_text())['log_history']
    strip = lambda h: [{k: v for k, v in e.items() if 'runtime' not in k and 'per_second' not in k} for e in h if 'loss' in e]
    assert strip(state(tmp_path/'whole')) == strip(state(tmp_path/'split')), 'the logged losses and learning rates differ'

def test_half_written_checkpoint_is_never_resumed(tmp_path):
    killed = run(tmp_path, kill_at=8); assert killed.returncode == 17
    newest = tmp_path/'checkpoint-8'
    (newest/MANIFEST).unlink()                      # as if the process died before the seal
    with open(newest/'adapter_model.safetensors', 'r+b') as f: f.truncate(100)
    assert find_checkpoint(tmp_path, verbose=False).name == 'checkpoint-4'
    assert not newest.exists() and list(tmp_path.glob('checkpoint-8.incomplete*'))   # set aside, not deleted

def test_resume_refuses_a_changed_adapter(tmp_path):
    killed = run(tmp_path, kill_at=4); assert killed.returncode == 17
    changed = run(tmp_path, resume=True, r=8)
    assert changed.returncode != 0 and 'the LoRA adapter changed' in changed.stderr and "r: checkpoint 16, now 8" in changed.stderr

def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    from qlora_nb.loading import load_model
    from qlora_nb.peft_model import create_peft_model
    cfg = get_config('tiny')
    model = create_peft_model(load_model(cfg), cfg)
    with pytest.raises(ValueError, match='is not a training checkpoint'): check_resume_compatible(tmp_path, model)
    with pytest.raises(FileNotFoundError, match='No checkpoint folder'): check_resume_compatible(tmp_path/'nope', model)
    with pytest.raises(FileNotFoundError, match='No verified checkpoint'): train(cfg, str(tmp_path), resume=True)

def test_existing_run_is_not_overwritten(tmp_path):
    (tmp_path/'checkpoint-5').mkdir()
    with pytest.raises(FileExistsError, match='resume=True'): train(get_config('tiny'), str(tmp_path))

def test_nan_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    from qlora_nb.loading import load_model
    from qlora_nb.models import load_tokenizer
    from qlora_nb.peft_model import create_peft_model
    from qlora_nb.fast_path import speed_up
    cfg = get_config('tiny', max_steps=8, save_steps=2, eval_steps=1000, logging_steps=1)
    tok = load_tokenizer(cfg, verbose=False)
    model = create_peft_model(load_model(cfg, tok), cfg)
    speed_up(model, cfg, verbose=False)
    layer = model.base_model.model.model.layers[1].mlp
    state = {}
    layer.register_forward_hook(lambda m, i, o: o * float('nan') if state['t'].state.global_step == 4 else o)
    with pytest.raises(NonFiniteError, match='at step 5'):
        train(cfg, str(tmp_path), model=model, tokenizer=tok, before_training=lambda t: state.update(t=t))
    assert [c.name for c in checkpoints(tmp_path)] == ['checkpoint-2', 'checkpoint-4']
    assert all(verify_checkpoint(c) is None for c in checkpoints(tmp_path))
    saved = load_file(tmp_path/'checkpoint-4'/'adapter_model.safetensors')
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)

def test_bitsandbytes_optimizers_step_with_one_wait_and_the_same_arithmetic(tmp_path):
    "The Trainer's bitsandbytes optimizer is bitsandbytes' class with a step that waits for the GPU once (`one_sync_optimizer`, under `flat_optimizer`); the weights it makes are bitsandbytes' own, bit for bit (8-bit states, on the CPU)."
    import bitsandbytes as bnb
    from transformers import TrainingArguments
    from qlora_nb.fast_path import FastTrainer, one_sync_optimizer
    cls, kwargs = FastTrainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir=str(tmp_path), optim='paged_adamw_8bit', report_to=[]))
    assert cls.__name__ == 'AdamWFlat' and issubclass(cls, bnb.optim.AdamW) and kwargs['is_paged'] and kwargs['optim_bits'] == 8
    assert FastTrainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir=str(tmp_path), optim='adamw_torch', report_to=[]))[0] is torch.optim.AdamW
    model = torch.nn.ModuleDict(dict(lora_A=torch.nn.Linear(256, 16, bias=False), lora_B=torch.nn.Linear(16, 256, bias=False)))
    args = TrainingArguments(output_dir=str(tmp_path), optim='paged_adamw_8bit', report_to=[])
    assert len(FastTrainer.get_optimizer_cls_and_kwargs(args, model)[1]['adapters']) == 2
    args.fp16 = True        # the loss scaler unscales the gradients of the tensors the optimizer holds: no flat tensor then
    assert 'adapters' not in FastTrainer.get_optimizer_cls_and_kwargs(args, model)[1]
    weights = []
    for optimizer_cls in (bnb.optim.AdamW, cls):
        torch.manual_seed(0)
        w, small = torch.nn.Parameter(torch.randn(64, 256)), torch.nn.Parameter(torch.randn(16))   # 8-bit states; a 32-bit one (under 4,096)
        start = w.detach().clone()
        opt = optimizer_cls([w, small], lr=1e-2, optim_bits=8, weight_decay=0.01)
        for _ in range(4):
            w.grad, small.grad = torch.randn_like(w), torch.randn_like(small)
            opt.step()
        assert opt.state[w]['state1'].dtype == torch.uint8 and opt.state[small]['state1'].dtype == torch.float32
        assert (w - start).abs().max() > 1e-3                                           # the steps moved the weights
        weights.append((w.detach().clone(), small.detach().clone()))
    assert all(torch.equal(a, b) for a, b in zip(*weights))

def test_the_trainers_adapters_step_as_one_tensor_with_bitsandbytes_arithmetic(tmp_path):
    "With a bitsandbytes optimizer, the Trainer lays the LoRA matrices out as views of one tensor per group and steps each group in one call: the adapter it trains equals the one bitsandbytes' own class trains, bit for bit (8-bit states, on the CPU)."
    import bitsandbytes as bnb
    from transformers import Trainer
    from qlora_nb.core import seed_everything
    from qlora_nb.loading import load_model
    from qlora_nb.models import load_tokenizer
    from qlora_nb.peft_model import create_peft_model
    from qlora_nb.data import build_datasets
    from qlora_nb.fast_path import speed_up
    from qlora_nb.workflow import run_trainer
    cfg = get_config('tiny', r=64, max_steps=3, logging_steps=1, eval_steps=1000, save_steps=1000, learning_rate=1e-2)
    tok = load_tokenizer(cfg); data = build_datasets(cfg, tok)
    trained = []
    for own in (False, True):
        seed_everything(cfg.seed)
        model = create_peft_model(load_model(cfg, tok), cfg)
        speed_up(model, cfg, verbose=False)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer = run_trainer(model, tok, cfg, data, str(tmp_path/str(own)))
        trainer.args.optim = 'adamw_8bit'      # on the CPU the package picks PyTorch's AdamW; bitsandbytes' runs here too
        if own: trainer.optimizer_cls_and_kwargs = (bnb.optim.AdamW, Trainer.get_optimizer_cls_and_kwargs(trainer.args, model)[1])
        trainer.train()
        opt = trainer.optimizer.optimizer          # accelerate's wrapper holds the Trainer's optimizer
        adapters = [p for n, p in model.named_parameters() if p.requires_grad and 'lora_' in n]
        if not own:
            assert type(opt).__name__ == 'AdamWFlat' and len(opt.flat_groups) == 1
            flat, members, _ = opt.flat_groups[0]
            assert len(members) == len(adapters) > 2 and flat.numel() == sum(p.numel() for p in adapters)
            assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in adapters)
            assert opt.state[flat]['state1'].dtype == torch.uint8 and len(opt.param_groups[0]['params']) == 1
        else: assert not hasattr(opt, 'flat_groups')
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        assert max((trained[-1][n] - start[n]).abs().max() for n in start) > 1e-3     # it trained
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])

def test_flat_adapters_follow_a_load_and_their_state_resumes():
    "An adapter given new values after the optimizer was made (a checkpoint loaded into the model) is stepped from those values and becomes a view again; the flat state saves and loads into a fresh optimizer, which then steps as the first."
    import bitsandbytes as bnb
    from qlora_nb.fast_path import flat_optimizer
    make = lambda params: flat_optimizer(bnb.optim.AdamW)(params, lr=1e-2, optim_bits=8, weight_decay=0.0, adapters=params)
    params = [torch.nn.Parameter(torch.randn(16, 256)) for _ in range(3)]
    opt = make(params)
    flat = opt.flat_groups[0][0]
    loaded = torch.full((16, 256), 0.5)
    params[1].data = loaded.clone()                      # what loading weights into the model in place of a view does
    for p in params: p.grad = torch.zeros_like(p)        # a zero gradient with no weight decay leaves the values as they are
    opt.step()
    assert torch.equal(params[1].detach(), loaded) and torch.equal(flat.detach()[4096:8192].view(16, 256), loaded)
    assert params[1].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(fresh)
    resumed.load_state_dict(opt.state_dict())
    for ps, o in ((params, opt), (fresh, resumed)):
        for k in range(2):
            g = torch.Generator().manual_seed(k)
            for p in ps: p.grad = torch.randn(p.shape, generator=g)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))
    assert not torch.equal(params[1].detach(), loaded)   # the steps moved it
    again = make(params)                                  # a second run on the same model lays them out anew
    assert len(again.flat_groups[0][1]) == 3 and params[0].untyped_storage().data_ptr() == again.flat_groups[0][0].untyped_storage().data_ptr()

def test_the_trainer_walks_the_model_less_and_clips_the_same(tmp_path):
    "While the Trainer trains, the model's train() and zero_grad() take the short way, and are the model's own again afterwards; clipping over the trainable parameters listed once gives the stock clipping's norm and gradients, bit for bit."
    from transformers import TrainerCallback
    from qlora_nb.loading import load_model
    from qlora_nb.models import load_tokenizer
    from qlora_nb.peft_model import create_peft_model
    from qlora_nb.data import build_datasets
    from qlora_nb.fast_path import speed_up
    from qlora_nb.workflow import run_trainer
    cfg = get_config('tiny', max_steps=2, logging_steps=1, eval_steps=1000, save_steps=1000)
    tok = load_tokenizer(cfg)
    model = create_peft_model(load_model(cfg, tok), cfg)
    speed_up(model, cfg, verbose=False)
    trainer = run_trainer(model, tok, cfg, build_datasets(cfg, tok), str(tmp_path))
    seen = []
    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(('train' in model.__dict__, 'zero_grad' in model.__dict__, len(trainer._trainable), model.training))
    trainer.add_callback(Look()); trainer.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert seen == [(True, True, len(trainable), True)] * 2
    assert 'train' not in model.__dict__ and 'zero_grad' not in model.__dict__ and trainer._trainable is None
    assert all(p.grad is None for p in model.parameters())          # the short zero_grad ran after the last step
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 10 for p in trainable]
    clipped = []
    for listed in (trainable, None):                                 # None: the Trainer's own clipping
        for p, grad in zip(trainable, grads): p.grad = grad.clone()
        trainer._trainable = listed
        clipped.append((float(trainer._clip_grad_norm(model)), [p.grad.clone() for p in trainable]))
    assert clipped[0][0] == clipped[1][0] > 10 * cfg.max_grad_norm
    assert all(torch.equal(a, b) for a, b in zip(clipped[0][1], clipped[1][1]))
    assert max(float(p.grad.norm()) for p in trainable) < cfg.max_grad_norm + 1e-6

def test_tokens_are_counted_with_the_losses_and_match_the_trainers_own_count(tmp_path, monkeypatch):
    "The token count joins the step's one read of its losses; it must equal what the Trainer counts one micro-batch at a time."
    import qlora_nb.training as training
    cfg = get_config('tiny', max_steps=5, grad_accum=3, micro_batch=8, eval_steps=1000, save_steps=1000, logging_steps=1)
    ours = train(cfg, str(tmp_path/'ours'))
    monkeypatch.setattr(training.QLoRATrainer, '_counts_tokens', lambda self, inputs: False)   # the Trainer's own count
    stock = train(cfg, str(tmp_path/'stock'))
    logged = lambda t, key: [h[key] for h in t.state.log_history if 'loss' in h]
    assert ours.state.num_input_tokens_seen == stock.state.num_input_tokens_seen > 0
    assert logged(ours, 'num_input_tokens_seen') == logged(stock, 'num_input_tokens_seen') and len(set(logged(ours, 'num_input_tokens_seen'))) == 5
    assert logged(ours, 'loss') == logged(stock, 'loss')
