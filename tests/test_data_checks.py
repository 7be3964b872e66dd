"""The data checks `build_datasets` runs before tokenizing, on real files: empty or whitespace-only prompts and answers
are refused with the file line and the column (or dropped with drop_empty=True, and counted), repeated rows and eval
rows also in train give a warning, every error names the source line (not the shuffled index), and a file that is not
UTF-8 is refused with its line and byte offset."""
import json, warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from qlora_nb.config import get_config
from qlora_nb.models import tiny_tokenizer
from qlora_nb.data import (LINE, DataError, DataWarning, build_datasets, collator, load_records, reverse_words, trained_tokens,
                           write_jsonl)

@pytest.fixture(scope='module')
def tok(): return tiny_tokenizer()

def pairs(n=20):
    "Distinct prompt/completion rows: the shipped words."
    return reverse_words(n, 0)['train']

def build(path, tok, **kw):
    drop = kw.pop('drop_empty', False)
    return build_datasets(get_config('tiny', dataset=str(path), max_length=64, **kw), tok, verbose=False, drop_empty=drop)

def refusal(path, tok, **kw) -> str:
    with pytest.raises(DataError) as e: build(path, tok, **kw)
    return str(e.value)

# --- empty and whitespace-only prompts and answers -------------------------------------------------------------

def test_all_empty_completions_are_refused_naming_lines_count_and_column(tmp_path, tok):
    path = write_jsonl([dict(r, completion='') for r in pairs()], tmp_path/'d.jsonl')
    msg = refusal(path, tok)
    assert "column 'completion' (the answer) in 20 rows: line 1, line 2, line 3 and 17 more" in msg
    assert 'drop_empty=True' in msg and 'd.jsonl' in msg

def test_whitespace_prompts_are_named_by_their_file_lines_across_both_splits(tmp_path, tok):
    rows = pairs()
    for i in (2, 6, 16): rows[i] = dict(rows[i], prompt=' \n\t')   # lines 3, 7 and 17
    path = write_jsonl(rows, tmp_path/'d.jsonl')
    msg = refusal(path, tok, eval_fraction=0.5)   # half the rows go to eval, shuffled
    assert "column 'prompt' (the prompt) in 3 rows: line 3, line 7, line 17." in msg
    assert 'completion' not in msg.split('. An empty')[0].split(':', 1)[1]

def test_instruction_refuses_an_empty_output_and_instruction_but_not_an_empty_input(tmp_path, tok):
    rows = [dict(instruction=r['prompt'], input='', output=r['completion']) for r in pairs()]
    write_jsonl(rows, tmp_path/'ok.jsonl')
    assert len(build(tmp_path/'ok.jsonl', tok).train) > 0   # an empty input is fine
    rows[3] = dict(rows[3], output='  ')
    rows[8] = dict(rows[8], instruction='')
    msg = refusal(write_jsonl(rows, tmp_path/'bad.jsonl'), tok)
    assert "column 'instruction' (the prompt) in 1 row: line 9" in msg and "column 'output' (the answer) in 1 row: line 4" in msg
    assert "'input'" not in msg

def test_chat_refuses_empty_turns_naming_the_turn(tmp_path, tok):
    rows = [dict(messages=[dict(role='user', content=r['prompt']), dict(role='assistant', content=r['completion'])]) for r in pairs()]
    rows[4]['messages'][1]['content'] = ' '
    rows[10]['messages'][0]['content'] = ''
    msg = refusal(write_jsonl(rows, tmp_path/'chat.jsonl'), tok)
    assert "column 'messages' (assistant turn) in 1 row: line 5" in msg and "column 'messages' (user turn) in 1 row: line 11" in msg

def test_text_refuses_empty_text(tmp_path, tok):
    rows = [dict(text=r['prompt'] + r['completion']) for r in pairs()]
    rows[0] = dict(text='')
    assert "column 'text' (the text) in 1 row: line 1" in refusal(write_jsonl(rows, tmp_path/'t.jsonl'), tok)

def test_an_empty_csv_cell_is_named_by_its_file_line_after_a_multiline_cell(tmp_path, tok):
    rows = pairs(10)
    rows[0] = dict(rows[0], prompt='Reverse this,\nplease: ab\n')   # a quoted cell over three lines: lines 2-4
    rows[1] = dict(rows[1], completion='')                          # pandas writes an empty cell, read back as None
    pd.DataFrame(rows).to_csv(tmp_path/'d.csv', index=False)
    assert "column 'completion' (the answer) in 1 row: line 5" in refusal(tmp_path/'d.csv', tok)

def test_parquet_and_saved_folders_name_the_row(tmp_path, tok):
    rows = pairs(10)
    rows[3] = dict(rows[3], completion='')
    pd.DataFrame(rows).to_parquet(tmp_path/'d.parquet')
    msg = refusal(tmp_path/'d.parquet', tok)
    assert "in 1 row: row 4." in msg and 'line' not in msg
    held_out = pairs(13)[10:]
    held_out[1] = dict(held_out[1], prompt=' ')
    DatasetDict(train=Dataset.from_list(pairs(10)), validation=Dataset.from_list(held_out)).save_to_disk(tmp_path/'saved')
    assert "column 'prompt' (the prompt) in 1 row: row 2 of 'validation'" in refusal(tmp_path/'saved', tok)

def test_drop_empty_drops_and_counts_them(tmp_path, tok, capsys):
    rows = [dict(r, completion=' ' if i % 4 == 0 else r['completion']) for i, r in enumerate(pairs())]   # 5 blank
    path = write_jsonl(rows, tmp_path/'d.jsonl')
    data = build(path, tok, eval_fraction=0.25, drop_empty=True)
    stats = list(data.stats.values())
    assert sum(s.n_empty for s in stats) == 5 and sum(s.n_rows for s in stats) == 20 and sum(s.n_examples for s in stats) == 15
    assert len(data.train) + len(data.eval) == 15
    assert all(trained_tokens(ex['labels']) > 1 for split in (data.train, data.eval) for ex in split), 'no example trains only the EOS'
    build_datasets(get_config('tiny', dataset=str(path), max_length=64, eval_fraction=0.25), tok, drop_empty=True)
    printed = capsys.readouterr().out
    assert f"dropped ({data.stats['train'].n_empty} empty)" in printed and f"dropped ({data.stats['eval'].n_empty} empty)" in printed

def test_drop_empty_with_every_row_empty_is_still_an_error(tmp_path, tok):
    path = write_jsonl([dict(r, completion='') for r in pairs()], tmp_path/'d.jsonl')
    assert 'nothing is left to train on' in refusal(path, tok, drop_empty=True)

# --- repeated rows ----------------------------------------------------------------------------------------------

def test_identical_rows_warn_about_repeats_and_eval_rows_in_train(tmp_path, tok):
    path = write_jsonl(pairs(1) * 20, tmp_path/'same.jsonl')
    with pytest.warns(DataWarning) as caught: build(path, tok, eval_fraction=0.25)
    messages = [str(w.message) for w in caught if w.category is DataWarning]
    assert len(messages) == 2 and all('\n' not in m for m in messages)
    assert messages[0].startswith('14 of 15 train rows repeat another (1 distinct; e.g. line ')
    assert messages[1].startswith('5 of 5 eval rows also appear in train: the held-out loss will flatter the model')

def test_eval_rows_from_the_datasets_own_split_that_are_in_train_warn(tmp_path, tok):
    train, held_out = pairs(30)[:20], pairs(30)[17:]   # 3 of the 13 held-out rows are train rows
    DatasetDict(train=Dataset.from_list(train), validation=Dataset.from_list(held_out)).save_to_disk(tmp_path/'saved')
    with pytest.warns(DataWarning, match=r'^3 of 13 eval rows also appear in train: the held-out loss will flatter the model') as caught:
        build(tmp_path/'saved', tok)
    assert not any('train rows repeat' in str(w.message) for w in caught), 'the train rows are distinct'

def test_rows_that_differ_only_in_their_input_are_not_repeats(tmp_path, tok):
    rows = [dict(instruction='Reverse the word.', input=r['prompt'][9:-1], output=r['completion']) for r in pairs()]
    with warnings.catch_warnings():
        warnings.simplefilter('error', DataWarning)
        build(write_jsonl(rows, tmp_path/'d.jsonl'), tok)
    rows[5] = rows[0]
    with pytest.warns(DataWarning, match='1 of 1[89] train rows repeat another'): build(write_jsonl(rows, tmp_path/'d.jsonl'), tok)

# --- every error names the file line, and the line never reaches the model -----------------------------------

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_a_bad_row_is_named_by_its_file_line_whichever_split_it_lands_in(tmp_path, tok, seed):
    rows = [dict(messages=[dict(role='user', content=r['prompt']), dict(role='assistant', content=r['completion'])]) for r in pairs()]
    rows[1]['messages'][0] = dict(content=rows[1]['messages'][0]['content'])   # line 2: a message without a role
    msg = refusal(write_jsonl(rows, tmp_path/'chat.jsonl'), tok, eval_fraction=0.5, seed=seed)
    assert "chat.jsonl', line 2: a message needs a 'role'" in msg and 'train row' not in msg and 'eval row' not in msg

def test_load_records_keeps_the_file_line_through_the_shuffle_only_when_asked(tmp_path):
    pd.DataFrame([dict(question=f'What is {i} + {i}?', answer=f'{2 * i}!') for i in range(40)]).to_csv(tmp_path/'sums.csv', index=False)
    cfg = get_config('tiny', dataset=str(tmp_path/'sums.csv'), columns={'instruction': 'question', 'output': 'answer'}, eval_fraction=0.25)
    assert LINE not in load_records(cfg)['train'].column_names
    d = load_records(cfg, places=True)
    for split in d.values():
        assert split[LINE][:] == [f"line {int(q.split()[2]) + 2}" for q in split['instruction'][:]]

def test_the_line_column_never_reaches_the_tokenized_data_or_the_collator(tmp_path, tok):
    data = build(write_jsonl(pairs(), tmp_path/'d.jsonl'), tok)
    for split in (data.train, data.eval): assert split.column_names == ['input_ids', 'attention_mask', 'labels']
    cfg = get_config('tiny')
    for c in (collator(tok, cfg), collator(tok, replace(cfg, packing=True))):
        assert not [k for k in c([data.train[i] for i in range(3)]) if 'line' in k]

# --- files that are not UTF-8 -----------------------------------------------------------------------------------

def test_invalid_utf8_in_jsonl_names_the_line_and_byte_offset(tmp_path, tok):
    good = ''.join(json.dumps(r) + '\n' for r in pairs(2)).encode()
    data = good + '{"prompt": "Reverse: café\\n", "completion": "éfac"}\n'.encode('latin-1')
    (tmp_path/'d.jsonl').write_bytes(data)
    msg, offset = refusal(tmp_path/'d.jsonl', tok), data.index('é'.encode('latin-1'))
    assert f"is not UTF-8: line 3, byte offset {offset} holds the byte 0xe9" in msg
    assert 'd.jsonl' in msg and 'Re-save the file as UTF-8' in msg and 'DatasetGenerationError' not in msg

def test_a_latin1_csv_names_the_line_and_byte_offset(tmp_path, tok):
    pd.DataFrame(pairs(5) + [dict(prompt='Reverse: señor\n', completion='roñes')]).to_csv(tmp_path/'d.csv', index=False, encoding='latin-1')
    data = (tmp_path/'d.csv').read_bytes()   # each prompt ends in a newline, so each record spans two lines
    offset = data.index('ñ'.encode('latin-1'))
    msg = refusal(tmp_path/'d.csv', tok)
    assert data[:offset].count(b'\n') + 1 == 12 and f"line 12, byte offset {offset} holds the byte 0xf1" in msg and 'UTF-8' in msg

# --- the shipped dataset is untouched ----------------------------------------------------------------------------

def test_the_shipped_dataset_builds_with_no_warning(tok):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        data = build_datasets(get_config('tiny'), tok, verbose=False)
    assert [str(w.message) for w in caught] == []
    assert len(data.train) == 20000 and len(data.eval) == 200 and all(s.n_empty == 0 for s in data.stats.values())
