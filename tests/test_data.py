"""The data step on real files: each format's masking and EOS, the switches, truncation and dropping, the errors
raised before any model loads (each naming the problem), loading csv/jsonl/tsv/parquet/folders, both collators, and
the shipped word-reversal dataset."""
import json, os, subprocess, sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest, torch
from datasets import Dataset, DatasetDict

from qlora_nb.config import get_config, TINY_DATASET
from qlora_nb.models import tiny_tokenizer
from qlora_nb.data import (REVERSE_WORDS_FILES, IGNORE_INDEX, DataError, DatasetNotFound, asset, read_jsonl, write_jsonl,
                           reverse_words, load_records, data_format, format_prompt, response_text, encode_text, tokenize_dataset, build_datasets, check_max_length, template_length, collator,
                           PadCollator, eval_pairs, example_view, padding_tokens, trained_tokens)

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def tok(): return tiny_tokenizer()

@pytest.fixture
def cfg(): return get_config('tiny', max_length=64)

def rows(n=20):
    "Alpaca-style rows made from the shipped words."
    return [dict(instruction='Reverse the word.', input=word(r), output=r['completion']) for r in reverse_words(n, 0)['train']]

def word(row): return row['prompt'][len('Reverse: '):-1]

def prompt_len(row, fmt, tok): return len(encode_text(format_prompt(row, fmt, tok), tok))

# --- the shipped dataset ---------------------------------------------------------------------------------------

def test_shipped_files_are_what_the_generator_makes():
    shipped = {split: read_jsonl(asset(name)) for split, name in REVERSE_WORDS_FILES.items()}
    assert shipped == reverse_words()
    assert len(shipped['train']) == 20000 and len(shipped['eval']) == 200
    train, held_out = ({word(r) for r in shipped[s]} for s in ('train', 'eval'))
    assert len(train) == 20000 and len(held_out) == 200 and not train & held_out
    assert all(r['prompt'] == f"Reverse: {word(r)}\n" and r['completion'] == word(r)[::-1] != word(r) for s in shipped.values() for r in s)

def test_every_tiny_example_fits_the_tiny_max_length(tok):
    cfg = get_config('tiny')
    data = build_datasets(cfg, tok, verbose=False)
    for split in ('train', 'eval'):
        s = data.stats[split]
        assert s.longest <= cfg.max_length == 32 and s.n_truncated == s.n_dropped == 0
    assert len(data.train) == 20000 and len(data.eval) == 200 and data.format == 'completion'

def test_completion_masks_the_prompt_and_trains_the_completion(tok, cfg):
    row = reverse_words(1, 0)['train'][0]
    ds, stats = tokenize_dataset(Dataset.from_list([row]), tok, cfg)
    n = prompt_len(row, 'completion', tok)
    assert format_prompt(row, 'completion', tok) == row['prompt'] and response_text(row, 'completion') == row['completion']
    assert ds[0]['labels'] == [IGNORE_INDEX] * n + encode_text(row['completion'], tok) + [tok.eos_token_id]
    assert stats.format == 'completion' and data_format(['prompt', 'completion']) == 'completion'

def test_the_embedded_dataset_loads_by_name(cfg):
    assert cfg.dataset == TINY_DATASET
    d = load_records(cfg)
    assert set(d) == {'train', 'eval'} and d['eval'][0] == reverse_words()['eval'][0]

# --- formats, masking and the EOS ------------------------------------------------------------------------------

def test_instruction_masks_the_prompt_and_trains_the_answer_and_eos(tok, cfg):
    row = rows(1)[0]
    ds, stats = tokenize_dataset(Dataset.from_list([row]), tok, cfg)
    ex, n = ds[0], prompt_len(row, 'instruction', tok)
    assert ex['labels'][:n] == [IGNORE_INDEX] * n
    assert ex['labels'][n:] == encode_text(row['output'], tok) + [tok.eos_token_id]
    assert ex['input_ids'][-1] == ex['labels'][-1] == tok.eos_token_id
    assert stats.format == 'instruction' and stats.trained == len(row['output']) + 1

def test_train_on_prompt_trains_everything(tok, cfg):
    ds, _ = tokenize_dataset(Dataset.from_list(rows(5)), tok, replace(cfg, train_on_prompt=True))
    assert all(ex['labels'] == ex['input_ids'] for ex in ds)

def test_instruction_without_input_uses_the_short_template(tok, cfg):
    row = dict(instruction='Say hi.', output='hi')
    assert format_prompt(row, 'instruction', tok) == 'Instruction: Say hi.\nResponse:\n'
    assert format_prompt({**row, 'input': None}, 'instruction', tok) == format_prompt(row, 'instruction', tok)
    assert format_prompt({**row, 'input': 'x'}, 'instruction', tok) == 'Instruction: Say hi.\nInput: x\nResponse:\n'

def test_chat_trains_assistant_turns_only(tok, cfg):
    msgs = [dict(role='system', content='Be brief.'), dict(role='user', content='abc?'), dict(role='assistant', content='cba'),
            dict(role='user', content='xyz?'), dict(role='assistant', content='zyx'), dict(role='user', content='thanks')]
    ds, stats = tokenize_dataset(Dataset.from_list([dict(messages=msgs)]), tok, replace(cfg, max_length=256))
    ex = ds[0]
    trained = [t for t, l in zip(ex['input_ids'], ex['labels']) if l != IGNORE_INDEX]
    assert tok.decode(trained) == 'cba</s>zyx</s>'
    assert ex['labels'][-1] == ex['input_ids'][-1] == tok.eos_token_id   # the trailing user turn is dropped
    assert stats.format == 'chat'

def test_chat_reads_sharegpt_and_appends_eos_when_the_template_has_none(tok, cfg):
    plain = tiny_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    row = dict(messages=[{'from': 'human', 'value': 'abc'}, {'from': 'gpt', 'value': 'cba'}])
    ds, _ = tokenize_dataset(Dataset.from_list([row]), plain, replace(cfg, max_length=128))
    ex = ds[0]
    assert ex['input_ids'][-1] == ex['labels'][-1] == plain.eos_token_id
    assert plain.decode([t for t, l in zip(ex['input_ids'], ex['labels']) if l != IGNORE_INDEX]) == 'cba\n</s>'

def test_text_trains_everything_and_ends_with_eos(tok, cfg):
    ds, stats = tokenize_dataset(Dataset.from_list([dict(text='Hello there.')]), tok, cfg)
    ex = ds[0]
    assert ex['input_ids'] == encode_text('Hello there.', tok) + [tok.eos_token_id] == ex['labels']
    assert stats.format == 'text' and trained_tokens(ex['labels']) == len(ex['labels']) - 1

def test_auto_detects_each_format():
    assert data_format(['instruction', 'input', 'output']) == 'instruction'
    assert data_format(['instruction', 'output']) == 'instruction'
    assert data_format(['messages', 'id']) == 'chat'
    assert data_format(['text']) == 'text'

def test_pad_equal_to_eos_still_trains_the_eos(cfg):
    t = tiny_tokenizer(); t.pad_token = t.eos_token
    ds, _ = tokenize_dataset(Dataset.from_list(rows(4)), t, cfg)
    assert all(ex['labels'][-1] == t.eos_token_id for ex in ds)
    batch = collator(t, cfg)([ds[i] for i in range(4)])
    for ids, labels, mask in zip(batch['input_ids'], batch['labels'], batch['attention_mask']):
        n = int(mask.sum())
        assert labels[n - 1] == t.eos_token_id and (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == t.pad_token_id).all()

def test_a_bos_adding_tokenizer_gets_one_bos_in_the_prompt(cfg):
    from tokenizers import processors
    t = tiny_tokenizer()
    t._tokenizer.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', t.bos_token_id)])
    assert t('a')['input_ids'][0] == t.bos_token_id
    row = rows(1)[0]
    assert format_prompt(row, 'instruction', t).startswith('<s>Instruction:')
    ds, _ = tokenize_dataset(Dataset.from_list([row]), t, cfg)
    assert ds[0]['input_ids'][0] == t.bos_token_id and ds[0]['input_ids'][1] != t.bos_token_id

# --- truncation, dropping and the all-masked error -------------------------------------------------------------

def test_truncation_is_counted_and_cut_examples_carry_no_eos(tok, cfg):
    texts = [dict(text='short'), dict(text='x' * 100), dict(text='y' * 200)]
    ds, stats = tokenize_dataset(Dataset.from_list(texts), tok, cfg)
    assert stats.n_truncated == 2 and stats.n_examples == 3 and stats.longest == 64
    assert [len(ex['input_ids']) for ex in ds] == [6, 64, 64]
    assert ds[0]['labels'][-1] == tok.eos_token_id and ds[1]['labels'][-1] != tok.eos_token_id

def test_examples_with_every_label_masked_are_dropped_and_counted(tok, cfg):
    data = rows(3) + [dict(instruction='Summarise this. ' * 10, output='ok')]
    ds, stats = tokenize_dataset(Dataset.from_list(data), tok, cfg)
    assert stats.n_dropped == 1 and stats.n_examples == 3 == len(ds)
    assert all(trained_tokens(ex['labels']) > 0 for ex in ds)

def test_all_labels_masked_is_an_error_not_a_zero_loss(tok, cfg, tmp_path):
    write_jsonl([dict(instruction='Summarise this. ' * 10, output='ok')] * 5, tmp_path/'long.jsonl')
    with pytest.raises(DataError, match=r'all its labels masked.*max_length=64.*train_on_prompt=True'):
        build_datasets(get_config('tiny', max_length=64, dataset=str(tmp_path/'long.jsonl')), tok, verbose=False)

def test_max_length_below_the_template_names_the_minimum(tok, tmp_path):
    need = template_length('instruction', tok) + 1
    assert need == len('Instruction: \nResponse:\n') + 2
    path = write_jsonl(rows(5), tmp_path/'alpaca.jsonl')
    with pytest.raises(DataError, match=f'max_length=20 is shorter than the instruction template.*max_length >= {need}'):
        build_datasets(get_config('tiny', max_length=20, dataset=str(path)), tok, verbose=False)
    assert check_max_length(get_config('tiny', max_length=need), tok, 'instruction') == need

def test_a_row_with_a_missing_answer_is_named(tok, cfg):
    data = rows(3) + [dict(instruction='Reverse the word.', input='abc', output=None)]
    with pytest.raises(DataError, match=r"train row 3: column 'output' holds None"):
        tokenize_dataset(Dataset.from_list(data), tok, cfg)

# --- loading files, and the errors that name what is wrong -----------------------------------------------------

def write_as(path: Path, records: list):
    if path.suffix in ('.jsonl',): write_jsonl(records, path)
    elif path.suffix == '.json': path.write_text(json.dumps(records))
    elif path.suffix == '.csv': pd.DataFrame(records).to_csv(path, index=False)
    elif path.suffix == '.tsv': pd.DataFrame(records).to_csv(path, index=False, sep='\t')
    elif path.suffix == '.parquet': pd.DataFrame(records).to_parquet(path)
    return path

@pytest.mark.parametrize('suffix', ['.jsonl', '.json', '.csv', '.tsv', '.parquet'])
def test_local_files_load_and_split_reproducibly(tmp_path, suffix, tok):
    path = write_as(tmp_path/f'data{suffix}', rows(40))
    cfg = get_config('tiny', max_length=64, dataset=str(path), eval_fraction=0.1, seed=3)
    d = load_records(cfg)
    assert len(d['train']) == 36 and len(d['eval']) == 4
    assert d['eval']['input'] == load_records(cfg)['eval']['input']
    assert not set(d['train']['input']) & set(d['eval']['input'])
    data = build_datasets(cfg, tok, verbose=False)
    assert len(data.train) == 36 and data.train[0]['labels'][-1] == tok.eos_token_id

def test_no_eval_split_with_eval_fraction_zero(tmp_path, tok):
    path = write_as(tmp_path/'d.jsonl', rows(10))
    data = build_datasets(get_config('tiny', max_length=64, dataset=str(path), eval_fraction=0.0), tok, verbose=False)
    assert data.eval is None and len(data.train) == 10 and set(data.stats) == {'train'}

def test_a_saved_folder_uses_its_validation_split(tmp_path):
    DatasetDict(train=Dataset.from_list(rows(10)), validation=Dataset.from_list(rows(3))).save_to_disk(tmp_path/'saved')
    d = load_records(get_config('tiny', max_length=64, dataset=str(tmp_path/'saved')))
    assert len(d['train']) == 10 and len(d['eval']) == 3

def test_column_renames(tmp_path, tok):
    path = write_as(tmp_path/'qa.csv', [dict(question=r['input'], answer=r['output']) for r in rows(20)])
    cfg = get_config('tiny', max_length=64, dataset=str(path), columns={'instruction': 'question', 'output': 'answer'})
    d = load_records(cfg)
    assert d['train'].column_names == ['instruction', 'output']
    assert build_datasets(cfg, tok, verbose=False).format == 'instruction'

def test_missing_columns_list_the_existing_ones_and_suggest_columns(tmp_path, tok):
    path = write_as(tmp_path/'qa.jsonl', [dict(question='2+2?', answer='4')] * 10)
    with pytest.raises(DataError) as e: build_datasets(get_config('tiny', max_length=64, dataset=str(path)), tok, verbose=False)
    msg = str(e.value)
    assert "['question', 'answer']" in msg and "columns={'instruction': 'question', 'output': 'answer'}" in msg
    with pytest.raises(DataError, match=r"The chat format needs the column\(s\) \['messages'\]; the dataset has \['question', 'answer'\]"):
        build_datasets(get_config('tiny', max_length=64, dataset=str(path), dataset_format='chat'), tok, verbose=False)

def test_a_columns_map_to_a_missing_column_is_named(tmp_path):
    path = write_as(tmp_path/'qa.jsonl', [dict(question='2+2?', answer='4')] * 10)
    with pytest.raises(DataError, match=r"\['answr'\].*Its columns are \['question', 'answer'\]"):
        load_records(get_config('tiny', max_length=64, dataset=str(path), columns={'instruction': 'question', 'output': 'answr'}))

def test_a_missing_file_is_named(tmp_path, tok):
    missing = str(tmp_path/'nope.jsonl')
    with pytest.raises(DatasetNotFound, match='nope.jsonl'): build_datasets(get_config('tiny', max_length=64, dataset=missing), tok, verbose=False)
    assert issubclass(DatasetNotFound, FileNotFoundError) and issubclass(DataError, ValueError)

@pytest.mark.parametrize('content, name', [('', 'empty.jsonl'), ('instruction,output\n', 'header_only.csv')])
def test_an_empty_dataset_is_an_error(tmp_path, tok, content, name):
    (tmp_path/name).write_text(content)
    with pytest.raises(DataError, match='empty|no rows'):
        build_datasets(get_config('tiny', max_length=64, dataset=str(tmp_path/name)), tok, verbose=False)

def test_an_unknown_file_type_is_named(tmp_path):
    (tmp_path/'data.xml').write_text('<rows/>')
    with pytest.raises(DataError, match=r"data.xml.*\.jsonl"): load_records(get_config('tiny', max_length=64, dataset=str(tmp_path/'data.xml')))

def test_an_unreachable_hub_dataset_says_it_is_offline():
    code = ("from qlora_nb.config import get_config\nfrom qlora_nb.data import load_records, DatasetNotFound\n"
            "try: load_records(get_config('tiny', max_length=64, dataset='someone/no-such-dataset'))\n"
            "except DatasetNotFound as e: print('MESSAGE', e)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'HF_HUB_OFFLINE': '1'}).stdout
    assert "MESSAGE Could not load dataset 'someone/no-such-dataset'" in out and 'HF_HUB_OFFLINE is set' in out

# --- collators -------------------------------------------------------------------------------------------------

def test_right_padding(tok, cfg):
    ds, _ = tokenize_dataset(Dataset.from_list(rows(4)), tok, cfg)
    feats = [ds[i] for i in range(4)]
    batch = collator(tok, cfg)(feats)
    n = max(len(f['input_ids']) for f in feats)
    assert isinstance(collator(tok, cfg), PadCollator) and batch['input_ids'].shape == (4, n)
    for f, ids, mask, labels in zip(feats, batch['input_ids'], batch['attention_mask'], batch['labels']):
        k = len(f['input_ids'])
        assert ids[:k].tolist() == f['input_ids'] and (ids[k:] == tok.pad_token_id).all()
        assert mask[:k].all() and not mask[k:].any() and (labels[k:] == IGNORE_INDEX).all()

def test_packing_collator_is_padding_free_with_restarting_positions(tok, cfg):
    ds, _ = tokenize_dataset(Dataset.from_list(rows(3)), tok, cfg)
    feats = [ds[i] for i in range(3)]
    batch = collator(tok, replace(cfg, packing=True))(feats)
    lengths = [len(f['input_ids']) for f in feats]
    assert 'attention_mask' not in batch and batch['input_ids'].shape == (1, sum(lengths))
    assert batch['input_ids'][0].tolist() == sum((f['input_ids'] for f in feats), [])
    assert batch['position_ids'][0].tolist() == sum((list(range(n)) for n in lengths), [])
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(batch['labels'][0, s] == IGNORE_INDEX for s in starts)
    assert (batch['labels'] == tok.eos_token_id).sum() == 3

def test_packed_and_padded_batches_give_the_same_loss(tok, cfg):
    from qlora_nb.loading import load_model
    ds, _ = tokenize_dataset(Dataset.from_list(rows(4)), tok, cfg)
    feats = [ds[i] for i in range(4)]
    model = load_model(cfg, tok)
    model.config.use_cache = False
    with torch.no_grad():
        padded = model(**collator(tok, cfg)(feats)).loss
        packed = model(**collator(tok, replace(cfg, packing=True))(feats)).loss
    assert torch.allclose(padded, packed, atol=1e-4)

def test_padding_tokens():
    assert padding_tokens([3, 5, 2, 2], 2) == 2 + 0
    assert padding_tokens([4, 4, 4], 3) == 0

# --- held-out pairs and the inspector --------------------------------------------------------------------------

def test_eval_pairs_use_the_training_prompt(tok, cfg):
    pairs = eval_pairs(cfg, tok, n=5)
    first = reverse_words()['eval'][0]
    assert len(pairs) == 5 and pairs[0] == (first['prompt'], first['completion'])
    data = build_datasets(cfg, tok, verbose=False)
    for (prompt, answer), ex in zip(pairs, data.eval):
        p = encode_text(prompt, tok)
        assert ex['input_ids'] == p + encode_text(answer, tok) + [tok.eos_token_id]
        assert ex['labels'][:len(p)] == [IGNORE_INDEX] * len(p)

def test_eval_pairs_for_chat_and_text(tmp_path, tok):
    convo = [dict(role='user', content='abc'), dict(role='assistant', content='cba')]
    path = write_as(tmp_path/'chat.jsonl', [dict(messages=convo)] * 10)
    pairs = eval_pairs(get_config('tiny', max_length=64, dataset=str(path), eval_fraction=0.2), tok)
    assert pairs == [('<|user|>\nabc<|assistant|>\n', 'cba')] * 2
    text = write_as(tmp_path/'text.jsonl', [dict(text='hello')] * 10)
    with pytest.raises(DataError, match='no prompt/answer pairs'): eval_pairs(get_config('tiny', max_length=64, dataset=str(text)), tok)

def test_inspector_marks_masked_tokens(tok, cfg):
    ds, _ = tokenize_dataset(Dataset.from_list(rows(2)), tok, cfg)
    view = example_view(ds, tok, n=2)
    text, html = repr(view), view._repr_html_()
    first = rows(2)[0]
    assert text.splitlines()[0].endswith(f"[Instruction: Reverse the word.↵Input: {first['input']}↵Response:↵]{first['output']}</s>")
    assert len(text.splitlines()) == 2 and 'trained' in html and '&lt;/s&gt;' in html
