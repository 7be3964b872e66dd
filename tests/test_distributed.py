"""Several processes through accelerate: a real 2-process DDP run on the CPU (gloo, 4-bit weights) trains the same
adapter as one process at the same global batch; launch settings the machine or FSDP cannot run are refused with
the fix, before anything loads or launches."""
import itertools, subprocess, sys, time
from pathlib import Path
import pytest
from safetensors.torch import load_file
from accelerate.commands.launch import launch_command_parser
from qlora_nb.config import QLoRAConfig, ConfigError, get_config, problems
from qlora_nb.loading import load_model
from qlora_nb.cli import main
from qlora_nb.distributed import check_devices, launch_arguments, start_rank
from qlora_nb.checkpoints import checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QLORA_NB = str(Path(sys.executable).with_name('qlora-nb'))
FSDP_BF16 = dict(distributed='fsdp', num_processes=2, compute_dtype='bfloat16', quant_storage='bfloat16')

@pytest.mark.parametrize('overrides, words', [
    (dict(distributed='fsdp', num_processes=2), "quant_storage to the compute dtype.*not 'uint8'"),
    (dict(distributed='fsdp', num_processes=2, quant_storage='bfloat16'), "compute_dtype spelled out.*set compute_dtype='bfloat16'"),
    (dict(FSDP_BF16, quant_storage='float16'), "quant_storage equal to compute_dtype \\('bfloat16'\\).*set quant_storage='bfloat16'"),
    (dict(num_processes=0), 'num_processes=0 must be a whole number, 1 or more'),
    (dict(num_processes=1.5), 'num_processes=1.5 must be a whole number'),
    (dict(num_processes=2), "num_processes=2 needs distributed='ddp' or 'fsdp'"),
    (dict(distributed='ddp'), "distributed='ddp' needs num_processes of 2 or more"),
    (dict(distributed='dpp', num_processes=2), "distributed='dpp' is not known.*Did you mean 'ddp'"),
])
def test_bad_launch_settings_are_refused_before_loading(overrides, words):
    t = time.time()
    with pytest.raises(ConfigError, match=words): load_model(QLoRAConfig(**overrides))
    assert time.time() - t < 1, 'refused before any weights load'

def test_good_launch_settings_pass():
    for ok in (dict(distributed='ddp', num_processes=2), FSDP_BF16, dict(FSDP_BF16, compute_dtype='float32', quant_storage='float32')):
        assert problems(QLoRAConfig(**ok)) == []

def test_the_machine_is_checked_before_launching():
    ddp = get_config('tiny', distributed='ddp', num_processes=4)
    with pytest.raises(ConfigError, match='num_processes=4 but this machine has 2 GPUs: set num_processes=2'): check_devices(ddp, gpus=2)
    with pytest.raises(ConfigError, match="'fsdp' needs CUDA GPUs"): check_devices(get_config('tiny', **FSDP_BF16), gpus=0)
    assert 'gloo' in check_devices(ddp, gpus=0)

def test_a_launch_of_another_size_is_refused(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    with pytest.raises(ConfigError, match='started 3 processes but num_processes=2'): start_rank(get_config('tiny', distributed='ddp', num_processes=2))

def test_launch_arguments_are_accelerates_own():
    args = launch_command_parser().parse_args(launch_arguments(get_config('tiny', **dict(FSDP_BF16, compute_dtype='float32', quant_storage='float32')), ['qlora-nb', 'train']))
    assert args.use_fsdp and args.num_processes == 2 and args.fsdp_cpu_ram_efficient_loading == 'true' and args.no_python

def test_command_line_refuses_before_launching(capsys):
    t = time.time()
    assert main(['train', '--preset', 'tiny', '--set', 'distributed=fsdp', '--set', 'num_processes=2']) == 2
    assert "not 'uint8'" in capsys.readouterr().err and time.time() - t < 2

def _train(tmp_path, name, *settings):
    data = tmp_path/'words.jsonl'
    if not data.exists():   # 64 examples of uneven length, so the two ranks' batches hold different token counts
        lines = (ROOT/'qlora_nb'/'assets'/'reverse_words_train.jsonl').read_text().splitlines()[:64]
        data.write_text('\n'.join(lines) + '\n')
    command = [QLORA_NB, 'train', '--preset', 'tiny', '--set', f'dataset={data}', '--set', 'eval_fraction=0',
               '--set', 'max_steps=4', '--set', 'save_steps=2', '--output-dir', str(tmp_path/name), *settings]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return load_file(tmp_path/name/'adapter'/'adapter_model.safetensors')

def test_two_processes_train_the_same_adapter_as_one(tmp_path):
    "2 processes x micro_batch 2 (DDP, gloo, 4-bit) against 1 process x micro_batch 4: the same 4 examples at each step."
    one = _train(tmp_path, 'one', '--set', 'micro_batch=4')
    drive = tmp_path/'drive'   # and rank 0 alone copies each sealed checkpoint to the mirror
    two = _train(tmp_path, 'two', '--set', 'micro_batch=2', '--set', 'distributed=ddp', '--set', 'num_processes=2',
                 '--set', f'checkpoint_mirror={drive}')
    assert [c.name for c in checkpoints(drive)] == ['checkpoint-2', 'checkpoint-4'] and not list(drive.glob('.*'))
    assert all(verify_checkpoint(c) is None for c in checkpoints(drive))
    assert one.keys() == two.keys() and len(one) == 56
    largest_b = max(one[k].abs().max().item() for k in one if 'lora_B' in k)
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    # Same batches and the same token-weighted loss (the Trainer divides by the token count gathered from both ranks),
    # so the gradients differ only in the order of float32 additions: each rank sums its half, then gloo adds the
    # halves. Adam's first steps divide each gradient by its own size, which turns those ~1e-7 relative differences
    # into larger ones for the weights whose gradient is near zero: measured 9.0e-6 after 4 steps, 0.3% of one step
    # (learning rate 3e-3). The tolerance is 1% of one step; a wrong batch or a per-rank loss average would differ
    # by a sizeable part of a step (the B weights have moved up to ~7.5e-3 by then).
    assert largest_b > 1e-3, 'the adapter trained'
    assert gap < 3e-5, f'2-process adapter differs from the 1-process one by {gap:.3g}'
    for name in ('one', 'two'):   # one sealed checkpoint per save, written by rank 0 only after both ranks finished theirs
        assert sorted(p.name for p in (tmp_path/name/'checkpoints').glob('checkpoint-*')) == ['checkpoint-2', 'checkpoint-4']
        assert (tmp_path/name/'checkpoints'/'checkpoint-4'/'manifest.json').is_file()
    assert (tmp_path/'two'/'checkpoints'/'checkpoint-4'/'rng_state_1.pth').is_file()
