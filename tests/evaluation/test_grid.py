import pytest

from squeezekv.evaluation.decoding import QuantizedFullCache
from squeezekv.evaluation.grid import FULL, Cell, EvalConfig, to_json
from squeezekv.evaluation.tasks import TaskOptions


def grid(**fields) -> EvalConfig:
    return EvalConfig(
        task="ppl",
        model="m",
        budgets=(0.2,),
        policies=("h2o",),
        allocators=("uniform", "squeeze-bits"),
        **fields,
    )


def test_kv_bits_is_a_grid_axis_and_a_bits_planning_allocator_gets_one_cell():
    config = grid(kv_bits=(16, 8, 4), equal_bytes=True)
    assert [cell.key for cell in config.cells()] == [
        FULL,
        "h2o/uniform/0.2",
        "h2o/squeeze-bits/0.2",
        "h2o/uniform/0.2/8bit",
        "h2o/uniform/0.2/4bit",
    ]
    cell = config.cells()[-1]
    assert cell.row == "h2o × uniform × 4-bit"
    squeeze = config.cache_setting(cell)
    assert (squeeze.kv_bits, squeeze.equal_bytes) == (4, True)


def test_a_16_bit_grid_records_and_keys_as_before():
    config = grid()
    assert "kv_bits" not in to_json(config) and "equal_bytes" not in to_json(config)
    assert Cell("squeezekv", "h2o", "uniform", 0.2).key == "h2o/uniform/0.2"
    assert to_json(grid(kv_bits=(16, 8)))["kv_bits"] == [16, 8]
    assert "kv_group" not in to_json(grid(kv_bits=(16, 8)))


def test_a_key_group_reaches_every_quantized_cell_and_the_record():
    config = grid(kv_bits=(16, 8), equal_bytes=True, kv_group=16)
    assert to_json(config)["kv_group"] == 16
    setting = config.cache_setting(config.cells()[-1])
    assert (setting.kv_bits, setting.kv_group) == (8, 16)
    assert setting.to_dict()["kv_group"] == 16
    assert "kv_group" not in config.cache_setting(config.cells()[1]).to_dict()  # 16 bits: as before


def test_bad_kv_bits_in_a_grid_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="kv_bits=6 is not supported"):
        grid(kv_bits=(16, 6))


def test_the_fast_engine_takes_fixed_bits_and_refuses_bits_planned_per_sequence_before_anything_runs():
    fast = TaskOptions(engine="fast")
    EvalConfig("ppl", "m", (0.2,), ("h2o",), ("uniform",), options=fast, kv_bits=(16, 8, 4))
    with pytest.raises(ValueError, match="fast engine.*'squeeze-bits' plans bits per sequence"):
        grid(options=fast)


def test_transformers_quantized_cache_cells_come_after_the_full_cache_at_every_budget():
    config = grid(quantized_cache=(4, 2))
    cells = config.cells()
    assert [cell.key for cell in cells[:3]] == [
        FULL,
        "transformers-quantized/4bit",
        "transformers-quantized/2bit",
    ]
    assert cells[1].row == "transformers QuantizedCache × 4-bit" and cells[1].budget is None
    assert config.cache_setting(cells[2]) == QuantizedFullCache(2)
    assert to_json(config)["quantized_cache"] == [4, 2] and "quantized_cache" not in to_json(grid())
    with pytest.raises(ValueError, match="stores 2 or 4 bits, not 8"):
        grid(quantized_cache=(8,))
