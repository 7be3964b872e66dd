"""The subcommands after `train`, on the README's main job: generate, chat, eval, merge, export and estimate, and a
clear error, exit status 2 and nothing written for each kind of bad input."""
import io, json, shutil
from pathlib import Path
import pytest, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from qlora_nb.cli import main, hub_wanted
from qlora_nb.data import read_jsonl, asset, REVERSE_WORDS_FILES
from qlora_nb.export import llama_cpp_available

def held_out_rows(n=3):
    return read_jsonl(asset(REVERSE_WORDS_FILES['eval']))[:n]

def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err

def test_generate_reverses_held_out_words(main_job, capsys):
    run, _ = main_job
    for row in held_out_rows():
        code, out, _ = run_cli(capsys, 'generate', run, '--prompt', row['prompt'], '--max-new-tokens', 12)
        assert code == 0 and out.strip() == row['completion']

def test_generate_reads_a_prompt_file_and_refuses_one_that_is_not_text(main_job, capsys, tmp_path):
    run, _ = main_job
    row = held_out_rows(1)[0]
    (tmp_path/'prompt.txt').write_text(row['prompt'])
    code, out, _ = run_cli(capsys, 'generate', run / 'adapter', '--prompt-file', tmp_path/'prompt.txt')
    assert code == 0 and out.strip() == row['completion']       # an adapter folder works as well as its run folder
    (tmp_path/'prompt.bin').write_bytes(b'\x89PNG\r\n\x1a\n\xff\xfe')
    code, _, err = run_cli(capsys, 'generate', run, '--prompt-file', tmp_path/'prompt.bin')
    assert code == 2 and 'is not UTF-8 text' in err
    code, _, err = run_cli(capsys, 'generate', run)
    assert code == 2 and 'Give the request as --prompt TEXT or --prompt-file FILE' in err

def test_chat_answers_each_line_of_standard_input(main_job, capsys, monkeypatch):
    run, _ = main_job
    rows = held_out_rows(3)
    monkeypatch.setattr('sys.stdin', io.StringIO(''.join(r['prompt'] + '\n' for r in rows)))   # blank lines are skipped
    code, out, err = run_cli(capsys, 'chat', run, '--max-new-tokens', 12)
    assert code == 0 and out.split() == [r['completion'] for r in rows] and 'each line is a prompt of its own' in err

def test_eval_reports_what_the_run_reported(main_job, capsys):
    run, _ = main_job
    metrics = json.loads((run/'metrics.json').read_text())
    code, out, _ = run_cli(capsys, 'eval', run)
    assert code == 0
    assert f"eval loss {metrics['eval_loss_after']:.4f}" in out
    assert f"exact answers {metrics['accuracy_after']:.1%} of 200" in out

def test_eval_on_another_file_scores_every_row(main_job, capsys, tmp_path):
    run, _ = main_job
    rows = held_out_rows(5)
    (tmp_path/'more.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    code, out, _ = run_cli(capsys, 'eval', run, '--dataset', tmp_path/'more.jsonl')
    assert code == 0 and '(5 rows)' in out and 'of 5' in out
    code, _, err = run_cli(capsys, 'eval', run, '--dataset', tmp_path/'missing.jsonl')
    assert code == 2 and 'No dataset file' in err

def test_merge_writes_a_16_bit_model_plain_transformers_loads(main_job, capsys, tmp_path):
    run, _ = main_job
    code, out, _ = run_cli(capsys, 'merge', run, tmp_path/'merged', '--dtype', 'bfloat16')
    assert code == 0 and 'merged (bfloat16)' in out and 'top1_agreement' in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path/'merged')
    assert model.dtype == torch.bfloat16 and not hasattr(model.config, 'quantization_config')
    tokenizer = AutoTokenizer.from_pretrained(tmp_path/'merged')
    row = held_out_rows(1)[0]
    ids = tokenizer(row['prompt'], return_tensors='pt', add_special_tokens=False)
    got = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(got[0, ids['input_ids'].shape[1]:], skip_special_tokens=True).strip() == row['completion']
    before = sorted(p.name for p in (tmp_path/'merged').iterdir())
    code, _, err = run_cli(capsys, 'merge', run, tmp_path/'merged')     # never over what is there
    assert code == 2 and 'already exists' in err and sorted(p.name for p in (tmp_path/'merged').iterdir()) == before

@pytest.mark.parametrize('kind', ['f16', 'q8_0'])
def test_export_round_trips_through_llama_cpp(main_job, capsys, tmp_path, kind):
    assert llama_cpp_available(), 'llama-cpp-python is a dev dependency: the round trip needs it'
    run, _ = main_job
    code, out, _ = run_cli(capsys, 'export', run, tmp_path/f'tiny-{kind}.gguf', '--type', kind)
    assert code == 0, out
    tokens = float(out.split('same tokens on ')[1].split('%')[0]) / 100
    agreement = float(out.split('same greedy next token at ')[1].split('%')[0]) / 100
    assert tokens == 1.0
    assert agreement == 1.0 if kind == 'f16' else agreement >= 0.95

def test_every_subcommand_names_a_missing_folder(capsys, tmp_path):
    missing = tmp_path/'no-such-run'
    for argv in (['generate', missing, '--prompt', 'hi'], ['chat', missing], ['eval', missing],
                 ['merge', missing, tmp_path/'out'], ['export', missing, tmp_path/'out.gguf']):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and str(missing) in err and 'Traceback' not in err, (argv, err)
    assert not (tmp_path/'out').exists() and not (tmp_path/'out.gguf').exists()

def test_an_adapter_whose_base_is_gone_says_so(main_job, capsys, tmp_path):
    run, _ = main_job
    adapter = shutil.copytree(run/'adapter', tmp_path/'adapter')
    for name in ('qlora_nb.json', 'adapter_config.json'):     # as if trained on a local base folder since deleted
        record = json.loads((adapter/name).read_text())
        if 'base' in record: record['base']['model'] = str(tmp_path/'deleted-base')
        if 'base_model_name_or_path' in record: record['base_model_name_or_path'] = str(tmp_path/'deleted-base')
        (adapter/name).write_text(json.dumps(record))
    record = json.loads((adapter/'qlora_nb.json').read_text()); record['files'] = {}   # edited on purpose
    (adapter/'qlora_nb.json').write_text(json.dumps(record))
    code, _, err = run_cli(capsys, 'generate', adapter, '--prompt', 'Reverse: abc\n')
    assert code == 2 and 'deleted-base' in err and 'not here' in err

def test_estimate_says_what_fits_and_the_cheapest_change(capsys, tmp_path):
    code, out, _ = run_cli(capsys, 'estimate', '--preset', 'tiny', '--gpu', 'T4')
    assert code == 0 and 'T4' in out and ' fits' in out
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8).save_pretrained(tmp_path/'llama3-8b')     # config.json only: no weights anywhere
    code, out, _ = run_cli(capsys, 'estimate', '--preset', 'tiny', '--set', f'model={tmp_path/"llama3-8b"}', '--set', 'micro_batch=8', '--set', 'gradient_checkpointing=true',
                           '--set', 'max_length=2048', '--gpu', 'T4', '--gpu', 'A100-80GB')
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and 'does not fit: To fit the T4' in lines['T4'] and lines['A100-80GB'].endswith('fits')

def test_estimate_of_an_architecture_it_does_not_know_says_so(capsys):
    code, _, err = run_cli(capsys, 'estimate', '--preset', 'tiny', '--set', 'model=qlora_nb/tiny-gpt2')
    assert code == 2 and "'gpt2' has no intermediate_size" in err

def test_run_sh_stays_offline_unless_a_hub_model_or_dataset_is_named(tmp_path):
    (tmp_path/'model').mkdir(); (tmp_path/'model'/'config.json').write_text('{}')
    assert not hub_wanted(['train']) and not hub_wanted(['train', '--preset', 'tiny', '--set', 'max_steps=5'])
    assert not hub_wanted(['train', '--set', f'model={tmp_path/"model"}', '--set', 'dataset=data/mine.jsonl'])
    assert not hub_wanted(['train', '--set', 'model=qlora_nb/tiny-qwen3'])
    assert hub_wanted(['train', '--set', 'model=Qwen/Qwen2.5-0.5B']) and hub_wanted(['train', '--preset', 'colab-t4'])
    assert hub_wanted(['train', '--set', 'dataset=tatsu-lab/alpaca'])
    assert "hub_wanted" in (Path(__file__).parents[1]/'tools'/'run.sh').read_text()
