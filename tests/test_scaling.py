"""The dry run's scale estimates: parameter counts against real models, ZeRO memory arithmetic, the plan."""
import re

import pytest

from selfexplain.distributed.cli import main as cli_main
from selfexplain.distributed.scaling import KNOWN_SHAPES, memory_per_rank_gb, shape_of
from selfexplain.groundtruth.models import ModelSpec, load_model


@pytest.mark.parametrize("source", ["tiny-llama:hidden=48,layers=3", "tiny-llama:hidden=32,layers=2,heads=4"])
def test_parameter_count_from_config_json_matches_the_model(tmp_path, source):
    model, _ = load_model(ModelSpec(source))
    model.save_pretrained(tmp_path)
    shape = shape_of(ModelSpec(str(tmp_path)))
    assert shape is not None and shape.params == sum(p.numel() for p in model.parameters())


def test_known_paper_models_have_their_published_sizes():
    assert KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"].params / 1e9 == pytest.approx(8.03, abs=0.01)
    assert KNOWN_SHAPES["Qwen/Qwen3-8B"].params / 1e9 == pytest.approx(8.19, abs=0.01)
    assert KNOWN_SHAPES["meta-llama/Llama-3.1-70B-Instruct"].params / 1e9 == pytest.approx(70.55, abs=0.05)


def test_zero_stages_partition_more_and_more():
    psi, n = 8_000_000_000, 8
    full = [memory_per_rank_gb(psi, psi, n, stage, bf16=True) for stage in range(4)]
    assert full[0] == pytest.approx(16 * psi / 1e9)  # 2 + 2 + 12 bytes per parameter
    assert full[0] > full[1] > full[2] > full[3] and full[3] == pytest.approx(full[0] / n)
    lora = [memory_per_rank_gb(psi, psi // 100, n, stage, bf16=True) for stage in range(4)]
    assert lora[2] > 2 * psi / 1e9 > lora[3], "frozen weights are split only by ZeRO-3"


def test_paper_dry_runs_print_the_scale_plan(capsys):
    # exit 2: the hub weights and CounterFact are not on this machine; the plan is printed all the same
    assert cli_main(["run", "configs/paper/activation_patching_70b_explainer.yaml", "--dry-run"]) == 2
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "train activation_patching: llama70b on llama8b" in x)
    assert "LoRA 1657M trainable" in line and "ZeRO-0 164.3" in line and "ZeRO-3 fits in 80 GB" in line
    with_gc, without = (float(x) for x in re.search(r"activations ([\d.]+) GB/micro-batch \(gradient checkpointing "
                                                        r"on; off: ([\d.]+) GB\)", line).groups())
    assert without > 10 * with_gc, "80 layers keep their inputs only, one layer its full set"
    assert "total:" in out and "GPU-hours" in out
    assert cli_main(["run", "configs/paper/activation_patching_70b_explainer.yaml", "--dry-run",
                     "--set", "train.num_workers=1", "--set", "train.zero_stage=2"]) == 2
    assert "ZeRO-2 does NOT fit" in capsys.readouterr().out
    assert cli_main(["run", "configs/quickstart.yaml", "--dry-run"]) == 0
    assert "GPU-hours" not in capsys.readouterr().out, "CPU recipes print no GPU estimate"
