"""bench/speed.py on the CPU with the tiny shape: the same code path as the GPU benchmark, in seconds. Its RESULT lines
parse, the two recipes agree step by step, padding-free batches count the same useful tokens as padded ones, and the
adapter it saves loads with plain peft."""
import importlib.util, json, math, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT/'bench'/'speed.py'
TINY = ['--shape', 'tiny', '--seq', '64', '--median', '24', '--bsz', '2', '--steps', '1', '--warmup', '1']

def speed_module():
    spec = importlib.util.spec_from_file_location('speed_bench', SCRIPT)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module

def run_speed(*args) -> tuple:
    "Run bench/speed.py; return its stdout and its RESULT and PARITY records."
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [(l.split(' ', 1)[0], json.loads(l.split(' ', 1)[1])) for l in p.stdout.splitlines() if l.startswith(('RESULT ', 'PARITY '))]
    return p.stdout, [r for k, r in records if k == 'RESULT'], [r for k, r in records if k == 'PARITY']

@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('speed')
    out, results, parity = run_speed(*TINY, '--compare', '--lengths', 'fixed', 'instruction', '--store', str(tmp/'models'),
                                     '--out', str(tmp/'speed.jsonl'), '--save-adapter', str(tmp/'adapter'))
    return tmp, results, parity

def test_result_lines_parse_and_are_finite(compared):
    tmp, results, parity = compared
    assert [(r['recipe'], r['lengths']) for r in results] == [('plain', 'fixed'), ('plain', 'instruction'),
                                                              ('project', 'fixed'), ('project', 'instruction')]
    for r in results:
        assert r['tokens_per_s'] > 0 and r['s_per_step'] > 0 and r['steps'] == 1
        assert len(r['step_s']) == r['steps'] and math.isclose(sum(r['step_s']), r['s_per_step'] * r['steps'], abs_tol=1e-3)
        assert min(r['step_s']) <= r['median_s_per_step'] <= max(r['step_s'])
        assert len(r['losses']) == 2 and all(math.isfinite(l) for l in r['losses'])
        assert r['first_loss'] == r['losses'][0] and r['last_loss'] == r['losses'][-1]
        for key in ('shape', 'mode', 'seq', 'bsz', 'peak_alloc_gib', 'peak_reserved_gib'): assert key in r
    lines = (tmp/'speed.jsonl').read_text().splitlines()
    assert len(lines) == 6 and sum(json.loads(l)['kind'] == 'PARITY' for l in lines) == 2

def test_the_recipes_agree_step_by_step(compared):
    _, _, parity = compared
    assert len(parity) == 2 and all(p['ok'] and p['steps'] == 2 for p in parity), parity
    assert all(p['dtype'] == 'float32' and p['max_rel_diff'] <= 1e-4 for p in parity)

def test_useful_tokens_leave_out_padding(compared):
    _, results, _ = compared
    fixed = [r for r in results if r['lengths'] == 'fixed']
    assert all(r['useful_tokens'] == r['fed_tokens'] == 2 * 64 * 1 for r in fixed)     # bsz x seq x timed steps
    varied = [r for r in results if r['lengths'] == 'instruction']
    assert varied[0]['useful_tokens'] == varied[1]['useful_tokens'] < varied[0]['fed_tokens']

def test_padding_free_offload_either_checkpointing_and_a_profile_feed_the_same_tokens_and_fused_kernels_say_why_off(compared, tmp_path):
    _, results, _ = compared
    padded = next(r for r in results if r['recipe'] == 'project' and r['lengths'] == 'instruction')
    out, runs, _ = run_speed(*TINY, '--lengths', 'instruction', '--packing', '--offload', 'off', 'on', '--store', str(tmp_path),
                             '--checkpointing', 'reentrant', '--profile')
    assert [r['offload'] for r in runs] == [False, True]
    assert padded['checkpointing'] == 'non-reentrant' and all(r['checkpointing'] == 'reentrant' for r in runs)
    assert 'profile' not in padded and all(r['profile']['step'] == 0 and r['profile']['cpu_s'] > 0 and r['profile']['top'] for r in runs)
    for packed in runs:
        assert packed['packing'] and packed['useful_tokens'] == packed['fed_tokens'] == padded['useful_tokens']
        assert abs(packed['first_loss'] - padded['first_loss']) <= 1e-5 * padded['first_loss']   # same examples, same model
        assert packed['fast_lora'] is True and any('LoRA4bit' in n for n in packed['fast_path'])
    assert runs[0]['losses'] == runs[1]['losses']             # offload moves tensors, never changes them
    if not torch.cuda.is_available():
        assert runs[0]['fused'] is False and 'fused kernels: off (no CUDA GPU' in out

def test_the_saved_adapter_loads_with_plain_peft(compared):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    tmp, _, _ = compared
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp/'models'/'tiny'), tmp/'adapter')
    saved = load_file(tmp/'adapter'/'adapter_model.safetensors')
    loaded = {n: p for n, p in model.named_parameters() if 'lora_' in n}
    assert len(saved) == len(loaded) == 2 * 7 * 2                       # A and B, 7 layers per block, 2 blocks
    trained_b = [p for n, p in loaded.items() if 'lora_B' in n]
    assert all(p.abs().sum() > 0 for p in trained_b)                   # B starts at zero: these were trained

def test_bad_arguments_are_refused(capsys):
    speed = speed_module()
    for argv, words in ((['--bsz', '0'], '--bsz 0 must be 1 or more'), (['--seq', '9000'], '--seq 9000 must be between'),
                        (['--recipe', 'plain', '--offload', 'on'], '--offload is a setting of the project recipe'),
                        (['--profile', '--warmup', '0'], '--profile profiles the last warm-up step')):
        with pytest.raises(SystemExit): speed.parse_args(argv)
        assert words in capsys.readouterr().err

def test_table_gives_ratios_against_the_plain_recipe(compared):
    tmp, _, _ = compared
    text = speed_module().table([tmp/'speed.jsonl'])
    rows = [l for l in text.splitlines() if l.startswith('| tiny')]
    assert len(rows) == 4 and all(r.split('|')[8].strip() not in ('', '-') for r in rows)
    assert 'parity tiny bsz 2 fixed' in text

def test_table_reads_reference_logs_and_gives_ratios_against_unsloth(compared, tmp_path):
    "A reference script's `RESULT {json}` line (mode 'unsloth') joins the table; ratios are against it, same shape and batch."
    tmp, results, _ = compared
    project = next(r for r in results if r['recipe'] == 'project' and r['lengths'] == 'fixed')
    peer = dict(shape='tiny', mode='unsloth', r=16, dropout=0.0, seq=64, bsz=2, steps=1, tokens_per_s=2 * project['tokens_per_s'],
                s_per_step=1.0, peak_alloc_gib=None, first_loss=1.0, last_loss=1.0)
    (tmp_path/'unsloth.log').write_text('loading...\nRESULT ' + json.dumps(peer) + '\n')
    text = speed_module().table([tmp/'speed.jsonl', tmp_path/'unsloth.log'])
    row = next(l for l in text.splitlines() if l.startswith('| tiny | 2 | fixed | project'))
    assert row.split('|')[9].strip() == '0.50'
    assert any(l.startswith('| tiny | 2 | fixed | unsloth') for l in text.splitlines())
