"""Does 4-bit cost quality? The four-way comparison of nbs/21_quality.ipynb on the CPU fact model, seed 0.

Margins come from repeated seeds (`python bench/quality_gpu.py --size cpu --seeds 0 1 2 --out bench/results/quality-cpu`,
raw lines in bench/results/quality-cpu/quality-cpu.jsonl; seed 42 is the notebook's run). Final held-out loss over
16-bit LoRA's, seeds 0 / 1 / 2 / 42: NF4 + DQ 0.89 / 1.03 / 0.96 / 1.07, NF4 0.90 / 1.03 / 0.97 / 1.07,
FP4 0.80 / 0.91 / 0.90 / 1.07; FP4 over NF4 + DQ 0.89 / 0.88 / 0.94 / 0.995; the untrained control 3.45-3.49 against
at most 0.48. Hence: no 4-bit base above 1.10 times 16-bit LoRA (the worst of four seeds, 1.07, plus a little; seed 0
sits at 0.89), FP4 no worse than NF4 + DQ (the paper finds the opposite; no run here does, though seed 42 came within
0.5%, so this one is seed 0's margin of 11%, not a law), every variant under half the control. The pretrained model
(about 60 s on 2 cores) is cached under cache_dir(), so it is built once per machine."""
import json
from pathlib import Path
import pytest
from qlora_nb.config import update
from qlora_nb.quality import pretrained_model_path, quality_config, compare_quantization, run_variant, weight_errors

@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('HF_HUB_OFFLINE', '1'); mp.delenv('IN_TEST', raising=False)
        yield quality_config('cpu', tmp_path_factory.mktemp('questions'), seed=0)

@pytest.fixture(scope='module')
def loss(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    rows = compare_quantization(cfg, out)
    rows.append(run_variant(update(cfg, model=str(pretrained_model_path('cpu', pretrained=False))), 'no pretraining',
                            out/'control', quantize=False))
    print({r['variant']: (round(r['final_loss'], 4), r['accuracy'], r['seconds']) for r in rows})
    return {r['variant']: r['final_loss'] for r in rows}

def test_the_base_knows_its_facts(cfg):
    assert json.loads((Path(cfg.model)/'pretraining.json').read_text())['probe'] >= 0.9

def test_answers_come_from_pretraining(loss):
    assert max(v for k, v in loss.items() if k != 'no pretraining') < 0.5 * loss['no pretraining'], loss

def test_no_4bit_base_costs_more_than_10_percent(loss):
    for k in ('NF4 + DQ', 'NF4', 'FP4'): assert loss[k] <= 1.10 * loss['16-bit LoRA'], (k, loss)

def test_fp4_is_no_worse_than_nf4_here(loss):
    assert loss['FP4'] <= loss['NF4 + DQ'], loss

def test_nf4_rounds_the_pretrained_weights_closer_than_fp4(cfg):
    nf4, _, fp4 = weight_errors(cfg.model)
    assert fp4['relative_mse'] >= 1.5 * nf4['relative_mse'], (nf4, fp4)   # seen: 1.75 (cpu), 1.76 (gpu)
